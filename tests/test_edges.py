"""Hostile and careless input at the edges, on real files, real processes and real mount namespaces: entries that are
not images, inputs that would take gigabytes, credentials in every option, outputs that belong to someone else, a
planted log link, a killed command's server, telemetry, and a read-only storage."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_flow import TINY_ANALYSIS_CLI, TINY_EXTRACTION_CLI

from cifar_transfer.errors import StorageNotWritable, is_transient
from cifar_transfer.flows import console
from cifar_transfer.flows.cli import main
from cifar_transfer.sources.folder import FolderSource
from conftest import CLI, TINY_CLI, copy_of_finished_run, wait_until

REPO = Path(__file__).resolve().parents[1]


def png(colour=(200, 30, 30), size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def cli(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`cifar-transfer ARGUMENTS` as a user runs it, in its own process, against the session's Prefect API (the
    temporary API a command starts without one has its own tests in test_flow.py)."""
    from prefect.settings import PREFECT_API_URL

    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run(
        [*CLI, *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=REPO,
    )


def last_line(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr).strip().splitlines()[-1]


def deep_folder(top: Path, levels: int, name: str) -> None:
    """`levels` nested folders named `name` below `top` (deeper than PATH_MAX allows to name: made relative to each
    parent's descriptor), with an image at depth 5 and one at the bottom."""
    descriptor = os.open(top, os.O_RDONLY)
    try:
        for level in range(levels):
            os.mkdir(name, dir_fd=descriptor)
            inner = os.open(name, os.O_RDONLY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
            if level in (4, levels - 1):
                file = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=descriptor)
                os.write(file, png((30, 30, 200)))
                os.close(file)
    finally:
        os.close(descriptor)


def remove_deep_folder(top: Path, name: str) -> None:
    """Remove what `deep_folder` made, walking down and up by relative steps (pytest's cleanup recurses per level)."""
    home = os.open(".", os.O_RDONLY)
    try:
        os.chdir(top)
        depth = 0
        while os.path.isdir(name):
            os.chdir(name)
            depth += 1
        for _ in range(depth):
            for entry in os.listdir("."):
                os.unlink(entry)
            os.chdir("..")
            os.rmdir(name)
    finally:
        os.fchdir(home)
        os.close(home)


@pytest.fixture
def hostile_tree(tmp_path) -> Path:
    """ROOT/train|test/<class>/ with real images, and in train/cat every kind of entry that is not one."""
    root = tmp_path / "tree"
    for split, count in (("train", 6), ("test", 3)):
        for name, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            (root / split / name).mkdir(parents=True)
            for number in range(count):
                (root / split / name / f"{number}.png").write_bytes(png(colour))
    cat = root / "train" / "cat"
    os.mkfifo(cat / "fifo.png")  # reading it would block forever
    os.symlink("/dev/zero", cat / "zero.png")  # reading it would never end
    with open(cat / "sparse.png", "wb") as sparse:  # 1 GB on no disk
        sparse.truncate(1 << 30)
    os.symlink("loop.png", cat / "loop.png")
    os.symlink(root / "test", cat / "folder.png")
    os.symlink(root / "missing.png", cat / "dangling.png")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(cat / "socket.png"))
    (cat / "clear\x1b[2J.png").write_bytes(b"not an image, and a name that would clear the terminal")
    deep_folder(root / "train" / "dog", 1100, "dddd")  # past Python's recursion limit and PATH_MAX
    yield root
    listening.close()
    remove_deep_folder(root / "train" / "dog", "dddd")


SKIPPED = {
    "train/cat/fifo.png": "not a regular file: a FIFO",
    "train/cat/zero.png": "not a regular file: a character device",
    "train/cat/sparse.png": "file is 1,073,741,824 bytes, over the cap of 268,435,456 bytes (raise --max-file-mb",
    "train/cat/loop.png": "cannot read the file: a symbolic link loop",
    "train/cat/folder.png": "not a regular file: a folder",
    "train/cat/dangling.png": "file not found",
    "train/cat/socket.png": "cannot read the file: not a regular file: a socket",
}
UNDECODABLE = {"train/cat/clear\x1b[2J.png": "not an image in a supported format"}  # read, then refused by the decoder


@pytest.mark.slow
def test_a_folder_of_entries_that_are_not_images_extracts_the_images_and_lists_the_rest(prefect_api, hostile_tree, tmp_path):
    listing = FolderSource(str(hostile_tree)).list_items()
    keys = {item.key for split in listing.splits.values() for item in split}
    assert set(SKIPPED | UNDECODABLE) <= keys and "train/dog/" + "dddd/" * 5 + "deep.png" in keys
    assert not any(key.count("dddd") > 800 for key in keys), "a path longer than PATH_MAX was listed"
    assert any("cannot list the folder: File name too long" in entry for entry in listing.skipped)

    storage = tmp_path / "storage"
    result = cli(
        "extract",
        "--source",
        str(hostile_tree),
        "--storage",
        str(storage),
        *TINY_CLI,
        timeout=420,
    )
    assert result.returncode == 0, last_line(result)
    assert "\x1b" not in result.stdout + result.stderr and "skipped train/cat/clear\\x1b[2J.png" in result.stdout + result.stderr
    (features,) = (storage / "features").iterdir()
    skipped = {entry["key"]: entry["reason"] for entry in json.loads((features / "train" / "_skipped.json").read_text())["skipped"]}
    assert set(skipped) == set(SKIPPED | UNDECODABLE)
    for key, reason in (SKIPPED | UNDECODABLE).items():
        assert skipped[key].startswith(reason), (key, skipped[key])
    manifest = json.loads((features / "train" / "_manifest.json").read_text())
    assert manifest["rows"] == 12 + 1  # the images and the deep one at depth 5 (the bottom one is past PATH_MAX)


def test_predict_reads_no_entry_that_is_not_a_regular_file(hostile_tree):
    """The same tree through predict's reader, in a child process that would hang or fill memory if it read them."""
    code = (
        "import json, sys; from cifar_transfer.sources.unlabelled import UnlabelledImages; images = UnlabelledImages(sys.argv[1]); "
        "print(json.dumps({path: reason for chunk in images.chunks(8) for path, data, reason in chunk}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(hostile_tree / "train" / "cat")], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    for key, reason in SKIPPED.items():
        assert rows[str(hostile_tree / key)].startswith(reason), (key, rows[str(hostile_tree / key)])
    assert [rows[str(hostile_tree / "train" / "cat" / f"{number}.png")] for number in range(6)] == [None] * 6


PEAK_CHILD = """
import io, json, sys
def peak_kib():  # VmHWM: this process's own peak (ru_maxrss carries the forking parent's peak across exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
from cifar_transfer.sources.images import UndecodableImage, decode_image
from cifar_transfer.sources.parquet import ParquetSource
kind, path = sys.argv[1], sys.argv[2]
base, outcome = peak_kib(), "ok"
if kind == "image":
    try:
        decode_image(open(path, "rb").read(), 224)
    except UndecodableImage as error:
        outcome = error.reason
elif kind == "images":  # the same image twice in one shard, on two threads
    import numpy as np
    from cifar_transfer.sources.images import decode_into
    data = open(path, "rb").read()
    reasons = decode_into(np.empty((2, 224, 224, 3), np.uint8), [(data, None), (data, None)], threads=2)
    outcome = "ok" if reasons == [None, None] else repr(reasons)
elif kind == "predict":
    from cifar_transfer.sources.unlabelled import UnlabelledImages
    reasons = {reason for chunk in UnlabelledImages(path).chunks(8) for _, _, reason in chunk}
    outcome = reasons.pop() if len(reasons) == 1 else repr(reasons)
else:
    source = ParquetSource(path, test_fraction=0.5)
    listing = source.list_items()
    (_, data, reason), = source.read_items([(listing.splits["train"] + listing.splits["test"])[0]])
    outcome = "ok" if data is not None else reason
print(json.dumps({"peak_mib": (peak_kib() - base) / 1024, "outcome": outcome}))
"""


def peak_of(kind: str, path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PEAK_CHILD, kind, str(path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_peak_memory_stays_bounded_for_the_largest_images_the_caps_admit(tmp_path):
    """A 100-megapixel 16-bit PNG and an RGBA one (a few hundred KB each) took 2,034 and 1,653 MB to decode; two such
    images of one shard, decoded on two threads, may not hold two at once."""
    side = 9_999  # 99,980,001 pixels
    gray16, rgba = tmp_path / "gray16.png", tmp_path / "rgba.png"
    gradient = (np.arange(side, dtype=np.uint32) * 6 % 65536).astype(np.uint16)
    Image.fromarray(np.broadcast_to(gradient, (side, side)).copy()).save(gray16)
    Image.new("RGBA", (side, side), (40, 120, 200, 128)).save(rgba)
    for path, held_mib in ((gray16, 191 + 95), (rgba, 381)):  # the decoded image (and its 8-bit copy)
        measured = peak_of("image", path)
        assert measured["outcome"] == "ok"
        assert measured["peak_mib"] < held_mib * 1.2, (path.name, measured)
    # Two of them in one shard, on two decoding threads: still one image's memory, as they decode one at a time.
    measured = peak_of("images", gray16)
    assert measured["outcome"] == "ok"
    assert measured["peak_mib"] < (191 + 95) * 1.2, measured


@pytest.mark.slow
def test_a_table_whose_row_group_is_over_the_cap_is_refused_in_one_line_without_reading_it(tmp_path):
    rng = np.random.default_rng(0)
    cells = [{"bytes": png() + rng.bytes(1_000_000), "path": None} for _ in range(300)]  # 300 MB in one row group
    table = pa.table({"image": pa.array(cells), "label": pa.array([number % 2 for number in range(300)])})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=300, compression="none")
    del table, cells
    measured = peak_of("table", tmp_path / "big.parquet")
    assert measured["outcome"].startswith(
        "big.parquet: row group 0 holds 286 MiB of images, over the cap of 256 MiB read at once: rewrite the table with smaller row groups"
    )
    assert measured["peak_mib"] < 50, measured
    measured = peak_of("predict", tmp_path / "big.parquet")  # every row of it, through predict's reader
    assert measured["outcome"].startswith(f"{tmp_path / 'big.parquet'}: row group 0 holds 286 MiB of images, over the cap")
    assert measured["peak_mib"] < 50, measured


def test_only_network_and_server_errors_are_retried():
    local = [
        OSError(code, os.strerror(code))
        for code in (errno.ENOENT, errno.EACCES, errno.ELOOP, errno.EISDIR, errno.ENAMETOOLONG, errno.EROFS, errno.ENOSPC)
    ]
    for error in [*local, ValueError("bad shard name"), RecursionError(), MemoryError(), StorageNotWritable("x")]:
        assert not is_transient(error), error
    for error in [
        ConnectionResetError(),
        TimeoutError(),
        OSError(errno.ECONNREFUSED, "refused"),
        OSError("s3 slow down"),
        RuntimeError("a worker died"),
    ]:
        assert is_transient(error), error


@pytest.mark.parametrize(
    "arguments, option",
    [
        (["run", "--source", "https://user:pa#ss@example.com/c.tar.gz", "--md5", "none"], "--source"),
        (["run", "--source", "photos/", "--classes", "https://user:s3cr3t@example.com/classes.txt"], "--classes"),
        (["extract", "--weights", "https://example.com/w.h5?token=s3cr3t"], "--weights"),
        (["predict", "s3://AKIA:s3cr3t@bucket/images/"], "SOURCE"),
        (["predict", "photos/", "--storage", "s3://AKIA:s3cr3t@bucket/storage"], "--storage"),
        (["predict", "photos/", "--output", "gcs://bucket/out.json?X-Goog-Signature=s3cr3t"], "--output"),
        (["verify", "--storage", "s3://AKIA:s3%2Fcr3t@bucket"], "--storage"),
        (["list", "--storage", "s3://AKIA:s3cr3t@bucket"], "--storage"),
        (["rm", "abc", "--storage", "s3://AKIA:s3cr3t@bucket"], "--storage"),
        (["gc", "--keep", "1", "--storage", "s3://AKIA:s3cr3t@bucket"], "--storage"),
        (["export", "--output", "s3://AKIA:s3cr3t@bucket/model"], "--output"),
        (["export", "--output", "out", "--storage", "simplecache::s3://AKIA:s3cr3t@bucket"], "--storage"),
    ],
)
def test_credentials_in_any_url_option_are_refused_before_anything_is_logged(arguments, option, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the log folder, had one been made
    assert main(arguments) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith(f"cifar-transfer: error: {option} embeds credentials")
    assert "s3cr3t" not in out + err and "pa#ss" not in out + err and "AKIA" not in out + err
    assert list(tmp_path.iterdir()) == [], "a log file was started before the refusal"


def test_the_log_folder_must_be_private_and_a_planted_link_is_never_followed(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    folder = console.log_folder()
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.stat().st_uid == os.getuid()
    os.chmod(folder, 0o777)
    with pytest.raises(console.ConfigError, match=r"is not a private folder of yours .*: remove it, or set TMPDIR"):
        console.log_folder()
    os.chmod(folder, 0o700)
    if os.getuid() == 0:
        os.chown(folder, 65534, 65534)  # another user's
        with pytest.raises(console.ConfigError, match="is not a private folder of yours"):
            console.log_folder()
        os.chown(folder, 0, 0)
    shutil.rmtree(folder)
    os.symlink(tmp_path, folder)  # a link planted where the folder goes
    with pytest.raises(console.ConfigError, match="is not a private folder of yours"):
        console.log_folder()

    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    planted = tmp_path / "planted.log"
    os.symlink(victim, planted)
    with pytest.raises(OSError) as error:
        console._PrivateFileHandler(planted, encoding="utf-8")
    assert error.value.errno == errno.ELOOP and victim.read_text() == "root's file\n"
    handler = console._PrivateFileHandler(tmp_path / "own.log", encoding="utf-8")
    handler.emit(logging.makeLogRecord({"msg": "written"}))
    handler.close()
    assert (tmp_path / "own.log").stat().st_mode & 0o777 == 0o600


def children_of(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError):
                continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_command_takes_its_temporary_prefect_server_with_it(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API")}
    command = [
        *CLI,
        "extract",
        "--source",
        str(path),
        "--md5",
        md5,
        "--storage",
        str(tmp_path / "storage"),
        *TINY_CLI,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment, cwd=REPO)
    try:
        servers = wait_until(
            lambda: [pid for pid, line in children_of(process.pid).items() if "uvicorn" in line], 120, "the command's temporary server"
        )
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        wait_until(
            lambda: (
                not any(
                    os.path.exists(f"/proc/{pid}") and "uvicorn" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
                    for pid in servers
                )
            ),
            15,
            "the server to stop after its command was killed",
        )
    finally:
        process.kill()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the temporary API is started by the command only on Linux")
def test_a_temporary_prefect_server_that_cannot_start_ends_the_command_in_one_line_with_the_fix(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    (tmp_path / "a-file").write_text("not a folder")
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API")}
    # A database its server cannot open: every start fails the same way
    environment["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path}/a-file/prefect.db"
    command = [*CLI, "extract", "--source", str(path), "--md5", md5, "--storage", str(tmp_path / "storage"), *TINY_CLI]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert said.count("Starting temporary server") == 3, said  # launched again, then given up
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cifar-transfer: error: RuntimeError: the temporary Prefect API exited with status 3 as it started")
    assert "set PREFECT_API_URL to a running Prefect server" in last
    assert not list((tmp_path / "storage").rglob("*.parquet")), "nothing is extracted without an API"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the temporary API is started by the command only on Linux")
def test_a_run_loads_its_modules_while_its_temporary_prefect_server_starts_and_never_imports_the_server():
    code = """if True:
        import json, os, sys, threading, time
        from cifar_transfer.flows import console, temporary_api
        seen = {}
        def children():
            pids = [pid for task in os.listdir("/proc/self/task") for pid in open(f"/proc/self/task/{task}/children").read().split()]
            return [open(f"/proc/{pid}/cmdline", "rb").read() for pid in pids]
        def meanwhile():
            seen["server launched"] = any(b"uvicorn" in line for line in children())
            seen["in another thread"] = threading.current_thread() is not threading.main_thread()
            seen["started"] = time.monotonic()
        temporary_api.start(meanwhile=meanwhile)
        returned = time.monotonic()
        for thread in threading.enumerate():
            if thread.name == temporary_api.MEANWHILE_THREAD:
                thread.join()
        from prefect import flow
        answered = flow(lambda: "answered", name="first")()  # a real flow run against the temporary API
        server_imported = "prefect.server.api.server" in sys.modules
        console.stop_prefect_quietly()
        stopped = not {"PREFECT_API_URL", "PREFECT_UI_URL"} & set(os.environ) and not any(b"uvicorn" in line for line in children())
        print(json.dumps({**seen, "started": seen["started"] < returned, "answered": answered, "server imported": server_imported,
                          "stopped": stopped}))
    """
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "server launched": True,
        "in another thread": True,
        "started": True,  # before `temporary_api.start` returned, which waits for the server to answer
        "answered": "answered",
        "server imported": False,  # the command is the API's client: Prefect's server modules load in the server only
        "stopped": True,  # its process ended, and the URLs it set for the command with it
    }


def test_an_extract_loads_its_flows_while_its_server_starts_and_leaves_tensorflow_to_the_shards_that_need_it():
    """What `extract` loads beside its temporary server (`load_run_modules(keras=False)`): the flows, not TensorFlow,
    which a rerun never needs; a `run`'s (the default) loads both."""
    code = """if True:
        import json, sys
        from cifar_transfer.flows.cli import load_run_modules
        load_run_modules(keras=False)
        extract = {"flows": "cifar_transfer.flows.pipeline" in sys.modules, "tensorflow": "tensorflow" in sys.modules}
        load_run_modules()
        print(json.dumps({"extract": extract, "run": {"tensorflow": "tensorflow" in sys.modules}}))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"extract": {"flows": True, "tensorflow": False}, "run": {"tensorflow": True}}


@pytest.mark.slow
def test_openvino_sends_no_telemetry_outside_ci_either():
    code = """if True:
        import sys, cifar_transfer
        from cifar_transfer.config import PipelineConfig
        from cifar_transfer.extractors import openvino_model
        config = PipelineConfig(backbone="MobileNetV2", weights="none", input_size=32, md5="none")
        openvino_model(config.feature_spec("0" * 32, "openvino", "float32"), (32, 32, 3), None)  # a real conversion
        import openvino.tools.ovc.telemetry_utils as used
        print(used.tm.__name__, sys.modules.get("openvino_telemetry"))
    """
    environment = {name: value for name, value in os.environ.items() if name != "CI"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=environment, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "None"]


def read_only_storage_run(storage: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    """`cifar-transfer ARGUMENTS` in a mount namespace of its own where `storage` is a read-only bind mount, against the
    session's Prefect API (the namespace shares the network), so that no command starts a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL

    script = f'mount --bind -o ro "{storage}" "{storage}" && exec "{sys.executable}" -m cifar_transfer.flows.cli "$@"'
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *arguments], capture_output=True, text=True, timeout=300, env=environment, cwd=REPO
    )


@pytest.mark.long
def test_a_complete_feature_set_on_read_only_storage_reruns_without_writing(finished_run, tiny_archive, tmp_path):
    if os.getuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only bind mount (CI has both: a skip fails there)")
    path, md5 = tiny_archive
    storage = tmp_path / "storage"
    copy_of_finished_run(finished_run, tiny_archive, storage)
    options = ["--source", str(path), "--md5", md5, "--storage", str(storage), *TINY_EXTRACTION_CLI]
    analysis = TINY_ANALYSIS_CLI
    assert main(["run", *options, *analysis]) == 0  # computes nothing; renders the copy's own HTML report
    written = {str(file): file.stat().st_mtime_ns for file in storage.rglob("*")}

    result = read_only_storage_run(storage, ["run", *options, *analysis])  # extraction, map, head and report
    assert result.returncode == 0, last_line(result)
    assert {str(file): file.stat().st_mtime_ns for file in storage.rglob("*")} == written

    result = read_only_storage_run(storage, ["extract", *options, "--input-size", "48"])  # new features: must write
    assert result.returncode == 2
    assert last_line(result).startswith(
        f"cifar-transfer: error: storage {storage} cannot be written (Read-only file system) and this run has "
    )
    assert "give it write access or use another --storage" in last_line(result)


def vm_size_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_out_of_memory_ends_the_command_with_one_line_and_exit_1(tmp_path):
    """An image the caps admit (121 megapixels: 462 MiB decoded) under a memory limit that cannot hold it, set on the
    running command once it has listed the collection: it ends at once with exit 1, never hangs."""
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for number in range(3):
                (root / split / name / f"{number}.png").write_bytes(png())
    Image.new("RGB", (11_000, 11_000), (9, 99, 199)).save(root / "train" / "cat" / "0.png")
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API")}
    environment["MALLOC_ARENA_MAX"] = "2"  # threads' malloc arenas reserve 64 MiB of address space each: keep the limit for pixels
    command = [
        *CLI,
        "extract",
        "--source",
        str(root),
        "--storage",
        str(tmp_path / "storage"),
        *TINY_CLI,
        "--engine",
        "openvino",
        "--precision",
        "float32",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, cwd=REPO)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "listed " in line:  # the collection is listed: next come the engine and the shards' decoding
                limit = (vm_size_kib(process.pid) + 400 * 1024) * 1024
                subprocess.run(["prlimit", f"--pid={process.pid}", f"--as={limit}"], check=True)
                break
        lines += process.stdout.readlines()
        assert process.wait(120) == 1
    finally:
        process.kill()
    assert lines[-1].startswith("cifar-transfer: error: out of memory: lower --batch-size or --shard-size"), lines[-5:]


def test_a_tables_rows_without_a_usable_label_are_listed_with_the_unreadable_ones(prefect_api, tmp_path):
    from test_collections import folder_config
    from test_sources_parquet import CLASSES, write_table

    from cifar_transfer.flows.pipeline import extract_features

    write_table(tmp_path / "table" / "train.parquet", [0, 1, 2, 3, 4, 5, None], [0, 1, 2, 7, None, 1, 0], names=CLASSES)
    write_table(tmp_path / "table" / "test.parquet", [6, 7], [0, 1], names=CLASSES)
    features, _ = extract_features(folder_config(tmp_path / "table", tmp_path / "storage"))
    skipped = json.loads((Path(features.folder) / "train" / "_skipped.json").read_text())["skipped"]
    assert skipped == [
        {"key": "train.parquet#3", "reason": f"label 7 is not a class index 0..{len(CLASSES) - 1}"},
        {"key": "train.parquet#4", "reason": "no label"},
        {"key": "train.parquet#6", "reason": "no image"},
    ]
    assert features.splits == {"train": 4, "test": 2}


def test_a_table_or_classes_file_that_is_not_a_regular_file_never_blocks(tmp_path):
    """A FIFO named like a table, and FIFOs or /dev/zero as the classes file: listed or refused, never opened to block."""
    from test_sources_parquet import CLASSES, write_table

    from cifar_transfer.errors import ConfigError
    from cifar_transfer.sources.parquet import ParquetSource

    write_table(tmp_path / "table" / "train.parquet", [0, 1], [0, 1], names=CLASSES)
    write_table(tmp_path / "table" / "test.parquet", [2], [0], names=CLASSES)
    os.mkfifo(tmp_path / "table" / "train-2.parquet")
    listing = ParquetSource(str(tmp_path / "table")).list_items()
    assert listing.skipped == ["train-2.parquet: not a regular file: a FIFO"] and len(listing.splits["train"]) == 2
    os.mkfifo(tmp_path / "classes.txt")
    for classes, problem in (
        (tmp_path / "classes.txt", "not a regular file: a FIFO"),
        ("/dev/zero", "not a regular file: a character device"),
        (tmp_path / "missing.txt", "no such file"),
    ):
        with pytest.raises(ConfigError, match=f"classes file .*: {problem}; pass --classes FILE"):
            ParquetSource(str(tmp_path / "table"), classes_file=str(classes)).list_items()
    from cifar_transfer.errors import SourceError
    from cifar_transfer.sources.unlabelled import UnlabelledImages

    (tmp_path / "incoming").mkdir()
    os.mkfifo(tmp_path / "incoming" / "table.parquet")
    with pytest.raises(SourceError, match="no image files .* or Parquet tables at"):
        UnlabelledImages(str(tmp_path / "incoming"))
