"""Where labelled images come from: archives decoded once (CIFAR-10/100), and collections read per shard
(an image folder tree, a Parquet table of encoded images). See `base.py` for the collection contract."""
