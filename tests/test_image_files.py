"""Training on the images people have: a flat or nested folder, a list file, or an ImageFolder tree (the same
samples as torchvision's), one order on every rank and across resumes, the index cache and when it is stale, bad
entries, and the one-line errors of everything that needs labels."""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision
from conftest import make_image_folder
from PIL import Image
from test_eval_knn import SMALL_IMAGES, write_checkpoint
from test_features import SPARO_TINY
from test_train import TINY, assert_same_training_state, executed_steps

import eval_knn
import main_dino
from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.data import image_files
from sparo_dino.data.datasets import BadImageError
from sparo_dino.data.image_files import DataIndexError, load_index, read_cache, write_cache
from sparo_dino.data.loader import TrainingData
from sparo_dino.eval import extraction
from sparo_dino.train.preemption import REQUEUE_EXIT_CODE, StopRequest
from sparo_dino.train.trainer import DinoTrainer

PIXELS = np.zeros((8, 8, 3), dtype=np.uint8)


def write_image(path: Path, value: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def make_nested_folder(root: Path) -> Path:
    """Unlabeled images at three depths, in names whose sorted order differs from the order of their folders'
    walk, with files a folder of images must skip (hidden, not images)."""
    for name in ("b.png", "a/b0.png", "a/b/x.PNG", "a/b/y.jpg", "c.gif", "a.jpeg", "deep/er/est.webp"):
        write_image(root / name)
    for name in ("notes.txt", ".hidden.png", ".cache/z.png", "a/._b0.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not an image")
    return root


NESTED_ORDER = ["a.jpeg", "a/b/x.PNG", "a/b/y.jpg", "a/b0.png", "b.png", "c.gif", "deep/er/est.webp"]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ kinds
def test_nested_folder_is_every_image_below_it_in_sorted_path_order(tmp_path) -> None:
    root = make_nested_folder(tmp_path / "photos")
    index = load_index(str(root))
    assert index.kind == "folder" and index.files == NESTED_ORDER
    dataset = index.dataset(transform=np.asarray, skip_bad_images=False)
    assert [path for path, _ in dataset.samples] == [str(root / name) for name in NESTED_ORDER]
    assert dataset.targets == [-1] * len(NESTED_ORDER) and dataset.classes == []
    image, label = dataset[3]
    assert image.shape == (8, 8, 3) and label == -1


def test_imagefolder_tree_gives_torchvisions_samples_in_its_order(tmp_path) -> None:
    """Class sub-folders with nested folders, names whose order differs between a folder walk and a sort of the
    full paths (b0.png vs b/), hidden and upper-case files: the same list as torchvision's ImageFolder."""
    root = tmp_path / "tree"
    for name in ("cat/b0.png", "cat/b/x.png", "cat/b/.y.png", "cat/B.JPG", "dog/a-b/1.png", "dog/a/2.png",
                 "dog/a.png", "dog/z.gif", ".hidden_class/q.png"):
        write_image(root / name)
    (root / "README.txt").write_text("a file at the top is not an image")
    index = load_index(str(root))
    reference = torchvision.datasets.ImageFolder(str(root))
    assert index.kind == "imagefolder" and index.classes == reference.classes
    assert index.dataset(None, skip_bad_images=False).samples == reference.samples
    trailing_slash = load_index(str(root) + "/").dataset(None, skip_bad_images=False)
    assert trailing_slash.samples == torchvision.datasets.ImageFolder(str(root) + "/").samples


def test_list_file_paths_are_relative_to_its_folder_in_its_order(tmp_path, monkeypatch) -> None:
    data = tmp_path / "data"
    for name in ("x/1.png", "x/2.png", "3.png"):
        write_image(data / name)
    absolute = write_image(tmp_path / "elsewhere" / "4.png")
    listing = data / "train.txt"
    listing.write_text(f"# training images\r\nx/2.png\r\n\n  3.png  \n{absolute}\nx/1.png\n# end\n")
    monkeypatch.chdir(tmp_path)  # not the list's folder
    index = load_index(str(listing))
    assert index.kind == "list" and index.files == ["x/2.png", "3.png", str(absolute), "x/1.png"]
    assert [path for path, _ in index.dataset(None, False).samples] == [
        str(data / "x/2.png"), str(data / "3.png"), str(absolute), str(data / "x/1.png")]
    (data / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataIndexError, match="lists no images"):
        load_index(str(data / "empty.txt"))


def test_missing_list_entry_names_the_list_line_and_file(tmp_path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png\n# comment\nb.png\nc.png\n")
    with pytest.raises(DataIndexError) as error:
        load_index(str(tmp_path / "list.txt"))
    assert one_line(error).startswith(f"{tmp_path / 'list.txt'} line 3: b.png is not an image file")
    assert "1 more of its 3 entries" in one_line(error)


def test_kind_detection_and_missing_data(tmp_path) -> None:
    assert image_files.detect_kind(make_image_folder(tmp_path / "tree", num_classes=2, per_class=1)) == "imagefolder"
    write_image(tmp_path / "tree" / "stray.png")  # an image at the top: the folder's images are unlabeled
    assert image_files.detect_kind(str(tmp_path / "tree")) == "folder"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataIndexError, match="no images in .*ImageFolder tree"):
        load_index(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_index(str(tmp_path / "nowhere"))


def test_unlabeled_extensions_are_formats_pillow_opens() -> None:
    Image.init()
    registered = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    assert set(image_files.UNLABELED_EXTENSIONS) <= registered
    assert set(torchvision.datasets.folder.IMG_EXTENSIONS) <= set(image_files.UNLABELED_EXTENSIONS)


@pytest.mark.parametrize("kind", ["folder", "list", "imagefolder"])
def test_corrupt_image_names_the_file_or_is_replaced_by_the_next_one(tmp_path, kind) -> None:
    names = [f"img_{i}.png" for i in range(4)]
    folder = tmp_path / "data" / ("class_a" if kind == "imagefolder" else "")
    for i, name in enumerate(names):
        write_image(folder / name, value=10 * i)
    bad = folder / names[1]
    bad.write_bytes(b"garbage")
    source = tmp_path / "data"
    if kind == "list":
        source = tmp_path / "data" / "list.txt"
        source.write_text("\n".join(names))
    with pytest.raises(BadImageError) as error:
        load_index(str(source)).dataset(np.asarray, skip_bad_images=False)[1]
    assert str(bad) in one_line(error)
    skipping = load_index(str(source)).dataset(np.asarray, skip_bad_images=True)
    with pytest.warns(RuntimeWarning, match=names[1]):
        assert skipping[1][0][0, 0, 0] == 20  # the next readable image
    assert skipping[1][0][0, 0, 0] == 20 and skipping.bad_images == [str(bad)]


# ------------------------------------------------------------------------------------- order and ranks
def test_every_rank_sees_the_same_order_whatever_the_file_system_lists_first(tmp_path, monkeypatch) -> None:
    root = make_nested_folder(tmp_path / "photos")
    config = vars(parse_train_args([*TINY, "--data_path", str(root), "--output_dir", str(tmp_path / "run"),
                                    "--batch_size_per_gpu", "1"]))
    rank0 = TrainingData(config, rank=0, world_size=2, device=torch.device("cpu"))
    scandir = os.scandir

    def reversed_scandir(path):
        class Entries(list):
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        with scandir(path) as entries:
            return Entries(reversed(list(entries)))

    monkeypatch.setattr(os, "scandir", reversed_scandir)  # another rank's file system: entries in another order
    rank1 = TrainingData(config, rank=1, world_size=2, device=torch.device("cpu"))
    assert rank0.dataset.samples == rank1.dataset.samples == [(str(root / n), -1) for n in NESTED_ORDER]


def _rank_worker(rank: int, store: str, good: str, bad: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # only the main process may look at the data: the other's view is a path that does not exist
        results.put((rank, "index", image_files.training_index(good if rank == 0 else "/nowhere", None).files))
        try:
            image_files.training_index(bad if rank == 0 else "/nowhere", None)
        except DataIndexError as error:
            results.put((rank, "error", str(error)))
    finally:
        dist.destroy_process_group()


def test_the_main_process_lists_and_the_others_receive_its_index_or_error(tmp_path) -> None:
    good = make_nested_folder(tmp_path / "photos")
    (tmp_path / "bad.txt").write_text("missing.png\n")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_rank_worker, args=(rank, str(tmp_path / "store"), str(good),
                                                            str(tmp_path / "bad.txt"), results)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    try:
        got = sorted(results.get(timeout=60) for _ in range(4))
    finally:
        for worker in workers:
            worker.join(timeout=10)
            worker.kill()
    assert got[:2] == [(0, "error", got[0][2]), (0, "index", NESTED_ORDER)]
    assert got[2:] == [(1, "error", got[0][2]), (1, "index", NESTED_ORDER)]
    assert "bad.txt line 1: missing.png" in got[0][2]


# ---------------------------------------------------------------------------------------------- cache
def _backdate(root: Path) -> None:
    """Folder times an hour in the past, so that a change the test makes now gives every folder a new time."""
    for folder in [root, *(path for path in root.rglob("*") if path.is_dir())]:
        os.utime(folder, ns=(folder.stat().st_atime_ns, folder.stat().st_mtime_ns - 3600 * 10**9))


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new_folder"])
def test_cache_is_used_until_a_folder_changes(tmp_path, monkeypatch, change) -> None:
    root = make_nested_folder(tmp_path / "photos")
    cache = str(tmp_path / "run" / image_files.INDEX_NAME)
    assert not load_index(str(root), cache).cached
    write_cache(load_index(str(root)), cache)
    assert [name for name in os.listdir(tmp_path / "run")] == [image_files.INDEX_NAME]  # no temporary left
    _backdate(root)
    write_cache(load_index(str(root)), cache)

    def no_listing(*args):
        raise AssertionError("listed the folder although its index is cached")

    with monkeypatch.context() as patch:
        patch.setattr(image_files, "_walk", no_listing)
        cached = load_index(str(root), cache)
    assert cached.cached and cached.files == NESTED_ORDER
    expected = list(NESTED_ORDER)
    if change == "add":
        write_image(root / "a" / "b" / "w.png")
        expected.insert(1, "a/b/w.png")
    elif change == "remove":
        (root / "deep" / "er" / "est.webp").unlink()
        expected.remove("deep/er/est.webp")
    elif change == "rename":
        (root / "a" / "b" / "y.jpg").rename(root / "a" / "b" / "z.jpg")
        expected[2] = "a/b/z.jpg"
    else:
        write_image(root / "a" / "new" / "n.png")
        expected.insert(4, "a/new/n.png")
    fresh = load_index(str(root), cache)
    assert not fresh.cached and fresh.files == expected


def test_cache_of_another_source_or_a_torn_file_is_not_used(tmp_path) -> None:
    first, second = make_nested_folder(tmp_path / "one"), make_image_folder(tmp_path / "two", per_class=2)
    cache = tmp_path / image_files.INDEX_NAME
    write_cache(load_index(str(first)), str(cache))
    assert read_cache(str(cache), "folder", str(first)) is not None
    assert read_cache(str(cache), "imagefolder", second) is None
    assert read_cache(str(cache), "imagefolder", str(first)) is None  # same folder, read as another kind
    cache.write_text(cache.read_text()[:50])  # a torn write
    assert read_cache(str(cache), "folder", str(first)) is None
    assert load_index(str(first), str(cache)).files == NESTED_ORDER


def test_list_cache_follows_the_list_file(tmp_path) -> None:
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\n")
    cache = str(tmp_path / "run" / image_files.INDEX_NAME)
    write_cache(load_index(str(listing)), cache)
    assert load_index(str(listing), cache).cached
    listing.write_text("a.png\nb.png\n")
    assert load_index(str(listing), cache).files == ["a.png", "b.png"]


# ------------------------------------------------------------------------------------------ main_dino
def test_flat_folder_trains_and_a_stopped_run_resumes_exactly(tmp_path, monkeypatch, capsys) -> None:
    """main_dino on a flat folder: stopped mid-epoch and rerun (which reads the index from its cache) it ends
    bit-identical to an uninterrupted run."""
    tree = Path(make_image_folder(tmp_path / "tree", num_classes=2, per_class=8, size=32))
    data = tmp_path / "flat"
    data.mkdir()
    for path in sorted(tree.rglob("*.png")):
        path.rename(data / f"{path.parent.name}_{path.name}")
    common = [*TINY, "--data_path", str(data), "--epochs", "2", "--print_freq", "1"]
    straight = str(tmp_path / "straight")
    assert main_dino.main([*common, "--output_dir", straight]) == 0
    assert "16 images, a folder of unlabeled images (listed in" in capsys.readouterr().out

    stop = StopRequest()
    step = DinoTrainer.train_step

    def step_then_request(self, crops, epoch, global_iteration):
        metrics = step(self, crops, epoch, global_iteration)
        if (epoch, self.iteration) == (0, 2):
            stop.request("test")
        return metrics

    monkeypatch.setattr(DinoTrainer, "train_step", step_then_request)
    resumed = str(tmp_path / "resumed")
    assert main_dino.main([*common, "--output_dir", resumed], stop=stop) == REQUEUE_EXIT_CODE
    capsys.readouterr()
    partial = torch.load(os.path.join(resumed, "checkpoint.pth"), weights_only=True)
    assert (partial["epoch"], partial["iteration"]) == (0, 3)  # saved at the step boundary after the request
    monkeypatch.undo()
    assert main_dino.main([*common, "--output_dir", resumed]) == 0
    out = capsys.readouterr().out
    assert f"index read from {os.path.join(resumed, image_files.INDEX_NAME)}" in out
    assert executed_steps(out) == [(0, 4), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert_same_training_state(straight, resumed)
    with open(os.path.join(resumed, image_files.INDEX_NAME)) as handle:
        assert len(json.load(handle)["files"]) == 16


def test_bad_list_entry_stops_main_dino_with_one_line(tmp_path, capsys) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png\nmissing.png\n")
    code = main_dino.main([*TINY, "--data_path", str(tmp_path / "list.txt"), "--output_dir", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "list.txt line 2: missing.png" in lines[0]


# -------------------------------------------------------------------------------------- labels needed
def test_knn_monitor_without_labelled_data_is_a_one_line_error_at_start(tmp_path, capsys) -> None:
    flat = make_nested_folder(tmp_path / "photos")
    argv = [*TINY, "--data_path", str(flat), "--output_dir", str(tmp_path / "run"), "--knn_every", "1"]
    with pytest.raises(SystemExit):
        parse_train_args(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--knn_every needs --knn_data_path" in err and f"{flat} is a folder of unlabeled images" in err
    unlabeled_splits = tmp_path / "monitor"
    write_image(unlabeled_splits / "train" / "a.png")
    make_image_folder(unlabeled_splits, num_classes=2, per_class=1, splits=("val",))
    with pytest.raises(SystemExit):
        parse_train_args([*argv, "--knn_data_path", str(unlabeled_splits)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--knn_data_path: {unlabeled_splits / 'train'} has no class sub-folders" in err
    assert not os.path.exists(tmp_path / "run")
    labelled = make_image_folder(tmp_path / "labelled", num_classes=2, per_class=1, splits=("train", "val"))
    assert parse_train_args([*argv, "--knn_data_path", labelled]).knn_data_path == labelled


def test_evaluation_of_unlabeled_folders_says_it_needs_class_folders(tmp_path) -> None:
    for split in ("train", "val"):
        write_image(tmp_path / "data" / split / "a.png")
    with pytest.raises(ValueError) as error:
        extraction.build_splits("imagefolder", str(tmp_path / "data"), None, None)  # eval_knn's and eval_linear's
    assert one_line(error).startswith(f"{tmp_path / 'data' / 'train'} has no class sub-folders")
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    with pytest.raises(ValueError, match="has no class sub-folders"):
        eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", str(tmp_path / "data"), *SMALL_IMAGES])
