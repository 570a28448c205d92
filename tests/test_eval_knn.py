"""eval_knn.py end to end on generated images: accuracy, summary lines, JSON, caching, slot analysis, bad input."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_features import SPARO_TINY, training_checkpoint
from test_knn import brute_force_scores

import eval_knn
import sparo_vit
from sparo_dino.data import augmentation
from sparo_dino.eval import feature_cache
from sparo_dino.io import weights

SUMMARY = re.compile(r"^(\d+)-NN classifier result: Top1: ([\d.]+), Top5: ([\d.]+)$", re.M)
# a k larger than the train bank: the line says the k the search used and the one asked for
CLIPPED = re.compile(r"^(\d+)-NN \(asked (\d+)\) classifier result: Top1: ([\d.]+), Top5: ([\d.]+)$", re.M)
SMALL_IMAGES = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "8"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(folder, options, seed=0):
    """A training checkpoint in the documented format around a freshly initialised backbone."""
    torch.manual_seed(seed)
    backbone = sparo_vit.build_backbone(**options)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "checkpoint.pth")
    torch.save(training_checkpoint(backbone, {**options, "drop_path_rate": 0.1, "out_dim": 3}), path)
    return path


@pytest.fixture
def sparo_checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "run", SPARO_TINY)


def test_knn_on_separable_images_with_slot_analysis(image_folder, sparo_checkpoint, capsys):
    results = eval_knn.main(["--pretrained_weights", sparo_checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                             "--nb_knn", "1", "5", "20", "100", "--per_slot", "--select_slots", "2",
                             "--holdout_fraction", "0.25", "--slot_knn", "5"])
    captured = capsys.readouterr()
    out = captured.out
    printed = {int(k): (float(top1), float(top5)) for k, top1, top5 in SUMMARY.findall(out)}
    clipped = {(int(used), int(asked)): float(top1) for used, asked, top1, _ in CLIPPED.findall(out)}
    assert sorted(printed) == [1, 5, 20]
    # k=100 > 24 train images is clipped to all 24, not a crash, and the summary says so instead of "100-NN"
    assert list(clipped) == [(24, 100)] and "100-NN classifier" not in out
    assert results["knn"]["100"]["k"] == 24 and results["knn"]["20"]["k"] == 20
    assert "warning: --nb_knn 100 asks for more neighbours than the 24 train features" in captured.err
    assert printed[5][0] >= 90.0, out
    assert all(top5 == 100.0 for _, top5 in printed.values())  # 3 classes: top-5 is top-3
    assert results["num_classes"] == 3 and results["num_train"] == 24 and results["num_test"] == 24
    assert len(results["per_slot"]["top1"]) == 4
    assert len(results["selected_slots"]["slots"]) == 2
    assert "5-NN classifier result with 2 selected slots: Top1: " in out
    saved = json.loads(open(os.path.join(os.path.dirname(sparo_checkpoint), "knn_checkpoint_teacher.json")).read())
    assert saved["knn"]["5"]["top1"] == pytest.approx(printed[5][0], abs=0.01)
    assert saved["meta"]["kind"] == "sparo_encoding" and saved["provenance"]["config"]["per_slot"] is True


def test_knn_baseline_arch_uses_final_norm_cls(image_folder, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "base", {"arch": "vit_tiny", "patch_size": 8, "img_size": 32})
    results = eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                             "--nb_knn", "5", "--output_dir", str(tmp_path / "out")])
    assert results["meta"]["kind"] == "cls_last1"
    assert results["knn"]["5"]["top1"] >= 90.0
    assert os.path.isfile(tmp_path / "out" / "knn_checkpoint_teacher.json")
    with pytest.raises(ValueError, match="need a slot read-out"):
        eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                       "--per_slot", "--output_dir", str(tmp_path / "out")])


def test_cached_features_give_the_same_result_and_keep_the_test_set_out_of_slot_selection(
        image_folder, sparo_checkpoint, tmp_path):
    cache = str(tmp_path / "cache")
    flags = ["--nb_knn", "5", "--select_slots", "2", "--holdout_fraction", "0.25", "--slot_knn", "5"]
    first = eval_knn.main(["--pretrained_weights", sparo_checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                           "--dump_features", cache, *flags])
    again = eval_knn.main(["--load_features", cache, *flags])  # no weights, no images needed
    assert again["knn"] == first["knn"] and again["selected_slots"] == first["selected_slots"]
    assert os.path.isfile(os.path.join(cache, "knn_checkpoint_teacher.json"))  # default output: the cache folder

    data = feature_cache.load_features(cache)
    args = eval_knn.build_parser().parse_args(flags)
    data.val_features = torch.randn_like(data.val_features) * 1e3  # a different test set...
    data.val_labels = data.val_labels.flip(0)
    scrambled = eval_knn.run_knn(data, args)
    assert scrambled["selected_slots"]["slots"] == first["selected_slots"]["slots"]  # ...selects the same slots
    assert scrambled["selected_slots"]["holdout_top1"] == first["selected_slots"]["holdout_top1"]

    with pytest.raises(ValueError, match="--num_slots 8 conflicts"):
        eval_knn.main(["--load_features", cache, "--num_slots", "8"])


def write_idx(path, array):
    """IDX ubyte file: two zero bytes, type 0x08, ndim, big-endian int32 dims, then the raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_knn_on_fashion_mnist_files_with_small_images(tmp_path, sparo_checkpoint):
    rng = np.random.default_rng(0)
    for prefix, size in (("train", 30), ("t10k", 12)):
        labels = np.arange(size) % 3
        images = rng.integers(0, 40, size=(size, 28, 28))
        for index, label in enumerate(labels):  # class = which horizontal band is bright
            images[index, 9 * label:9 * label + 9] += 200
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    results = eval_knn.main(["--pretrained_weights", sparo_checkpoint, "--dataset", "fashion_mnist",
                             "--data_path", str(tmp_path), *SMALL_IMAGES, "--nb_knn", "5"])
    assert results["num_train"] == 30 and results["num_test"] == 12
    assert results["num_classes"] == 10  # the dataset's classes, even when some have no samples here
    assert results["knn"]["5"]["top1"] >= 90.0


def test_architecture_flags_contradicting_the_checkpoint_are_an_error(image_folder, sparo_checkpoint):
    with pytest.raises(ValueError, match="--patch_size 16 conflicts with the checkpoint's config"):
        eval_knn.main(["--pretrained_weights", sparo_checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                       "--patch_size", "16"])


def test_val_split_with_other_classes_is_an_error(image_folder, sparo_checkpoint):
    shutil.rmtree(os.path.join(image_folder, "val", "class_1"))  # ImageFolder would renumber class_2 as 1
    with pytest.raises(ValueError, match=r"only in train: \['class_1'\]"):
        eval_knn.main(["--pretrained_weights", sparo_checkpoint, "--data_path", image_folder, *SMALL_IMAGES])


def test_bad_input_ends_with_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "eval_knn.py", "--pretrained_weights", str(tmp_path / "missing.pth"),
                             "--data_path", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'missing.pth'}"]


def test_official_launch_command_runs_unchanged(image_folder, sparo_checkpoint, tmp_path):
    """torch.distributed.launch adds --local-rank=0; --dist_url env:// and --use_cuda are official flags too."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1", "eval_knn.py",
         "--pretrained_weights", sparo_checkpoint, "--data_path", image_folder, *SMALL_IMAGES, "--nb_knn", "5",
         "--use_cuda", "false", "--dist_url", "env://", "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(SUMMARY.findall(result.stdout)) == 1
    saved = json.loads((tmp_path / "out" / "knn_checkpoint_teacher.json").read_text())
    assert saved["device"] == "cpu" and saved["provenance"]["config"]["use_cuda"] is False
    with pytest.raises(ValueError, match="--dist_url tcp://127.0.0.1:1 is not supported"):
        eval_knn.main(["--pretrained_weights", sparo_checkpoint, "--data_path", image_folder,
                       "--dist_url", "tcp://127.0.0.1:1"])


def test_use_cuda_picks_where_the_search_runs():
    cuda = torch.device("cuda", 0)
    assert eval_knn.search_device(True, cuda) == cuda  # official default: the bank on the GPU
    assert eval_knn.search_device(False, cuda) == torch.device("cpu")
    assert eval_knn.search_device(True, torch.device("cpu")) == torch.device("cpu")  # no GPU: simply the CPU


def _official_dump(folder, train, train_labels, test, test_labels):
    """What official DINO's eval_knn.py --dump_features writes: normalized features and labels, plain tensors."""
    os.makedirs(folder, exist_ok=True)
    for name, tensor in (("trainfeat", F.normalize(train, dim=1, p=2)), ("testfeat", F.normalize(test, dim=1, p=2)),
                         ("trainlabels", train_labels), ("testlabels", test_labels)):
        torch.save(tensor, os.path.join(folder, f"{name}.pth"))
    return str(folder)


def test_official_dump_loads_and_gives_the_brute_force_knn(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 4 * 16, generator=gen)
    train_labels, test_labels = torch.arange(30) % 3, torch.arange(12) % 3
    train = centers[train_labels] * 4 + torch.randn(30, 64, generator=gen) * 3
    test = centers[test_labels] * 4 + torch.randn(12, 64, generator=gen) * 3
    folder = _official_dump(tmp_path / "dump", train, train_labels, test, test_labels)
    results = eval_knn.main(["--load_features", folder, "--nb_knn", "5", "20"])
    assert results["num_classes"] == 3 and results["meta"]["kind"] == "official_dump"
    for k in (5, 20):
        scores = brute_force_scores(train, train_labels, test, 3, k, 0.07)  # on the raw, unnormalized features
        top1 = 100.0 * (scores.argmax(1) == test_labels).double().mean().item()
        assert results["knn"][str(k)]["top1"] == pytest.approx(top1, abs=1e-6)
    assert os.path.isfile(os.path.join(folder, "knn_official_dump.json"))
    capsys.readouterr()

    # slot analysis: normalizing the whole encoding does not change any slot's cosine, so an official dump of a
    # SPARO encoding ranks slots like the raw features; it only needs the number of slots
    with pytest.raises(ValueError, match="need --num_slots"):
        eval_knn.main(["--load_features", folder, "--per_slot"])
    with pytest.raises(ValueError, match="need a slot read-out"):
        eval_knn.main(["--load_features", folder, "--per_slot", "--arch", "vit_small"])
    from_dump = eval_knn.main(["--load_features", folder, "--per_slot", "--num_slots", "4", "--slot_knn", "5"])
    raw = eval_knn.run_knn(feature_cache.FeatureSet(train, train_labels, test, test_labels, ["a", "b", "c"],
                                                    {"kind": "sparo_encoding", "options": {"num_slots": 4}}),
                           eval_knn.build_parser().parse_args(["--per_slot", "--slot_knn", "5"]))
    assert from_dump["per_slot"]["top1"] == pytest.approx(raw["per_slot"]["top1"])


def test_dump_format_official_and_both(image_folder, sparo_checkpoint, tmp_path):
    flags = ["--nb_knn", "5", "20"]
    own = eval_knn.main(["--pretrained_weights", sparo_checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                         "--dump_features", str(tmp_path / "both"), "--dump_format", "both", *flags])
    official_files = ["trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth"]
    assert sorted(os.listdir(tmp_path / "both")) == sorted(["train_features.pth", "val_features.pth", *official_files])
    official_only = str(tmp_path / "official")
    eval_knn.main(["--pretrained_weights", sparo_checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                   "--dump_features", official_only, "--dump_format", "official", *flags])
    assert sorted(os.listdir(official_only)) == sorted(official_files)
    raw = feature_cache.load_features(str(tmp_path / "both"))  # the own format wins when both are present
    assert raw.meta["kind"] == "sparo_encoding"
    official = torch.load(os.path.join(official_only, "trainfeat.pth"), weights_only=True)
    torch.testing.assert_close(official, F.normalize(raw.train_features, dim=1))
    from_official = eval_knn.main(["--load_features", official_only, *flags])
    for k, accuracies in own["knn"].items():  # normalized again inside: the same neighbours
        assert from_official["knn"][k] == pytest.approx(accuracies)


def test_init_baseline_is_the_runs_own_initial_network_on_the_same_images(image_folder, tmp_path, capsys):
    """--init_baseline evaluates the network the trainer started from (same arch and seed; compared with the
    trainer's own teacher before its first step), on the same images with the same k-NN, next to the trained one."""
    from test_train import TINY

    import main_dino
    from sparo_dino import distributed
    from sparo_dino.cli.train_flags import parse_train_args
    from sparo_dino.run_config import RunConfig
    from sparo_dino.train.trainer import DinoTrainer

    train_argv = [*TINY, "--data_path", os.path.join(image_folder, "train"), "--epochs", "1", "--seed", "7",
                  "--lr", "0.05"]
    assert main_dino.main([*train_argv, "--output_dir", str(tmp_path / "run")]) == 0
    flags = parse_train_args([*train_argv, "--output_dir", str(tmp_path / "fresh")])
    untrained = DinoTrainer(RunConfig.from_flags(flags), distributed.init_distributed()).teacher.backbone.eval()
    checkpoint = str(tmp_path / "run" / "checkpoint.pth")
    capsys.readouterr()
    results = eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                             "--nb_knn", "5", "--knn_backend", "torch", "--init_baseline"])
    out = capsys.readouterr().out

    args = eval_knn.build_parser().parse_args(["--pretrained_weights", checkpoint])
    initial, _, _ = weights.load_backbone(args, at_init=True)
    trained, _, _ = weights.load_backbone(args)
    assert all(torch.equal(value, untrained.state_dict()[key]) for key, value in initial.state_dict().items())
    assert not all(torch.equal(value, initial.state_dict()[key]) for key, value in trained.state_dict().items())
    transform = augmentation.eval_transform(32, 32)
    splits = [torchvision_folder(os.path.join(image_folder, split), transform) for split in ("train", "val")]
    with torch.no_grad():
        (train_x, train_y), (val_x, val_y) = [(untrained(torch.stack([img for img, _ in split])),
                                               torch.tensor([label for _, label in split])) for split in splits]
    expected = brute_force_scores(train_x, train_y, val_x, 3, k=5, temperature=0.07)
    top1 = 100.0 * float((expected.argmax(1) == val_y).float().mean())
    assert results["init_baseline"]["5"]["top1"] == pytest.approx(top1, abs=1e-6)
    assert results["num_test"] == len(val_y)  # the same images for both
    gain = results["knn"]["5"]["top1"] - top1
    assert (f"5-NN classifier result at random init (same arch, seed and images): Top1: {top1:.2f}" in out
            and f"{gain:+.2f} points of Top1" in out), out


def torchvision_folder(root, transform):
    from torchvision.datasets import ImageFolder
    return ImageFolder(root, transform=transform)


def trained_sparo_run(image_folder, folder) -> str:
    """checkpoint.pth of one epoch of a tiny SPARO run (4 slots) on the fixture's train images."""
    from test_train import TINY

    import main_dino

    sparo = ["--arch", "vit_tiny_sparo", "--num_slots", "4", "--slot_dim", "8", "--attn_dim", "8"]
    assert main_dino.main([*TINY, *sparo, "--data_path", os.path.join(image_folder, "train"), "--epochs", "1",
                           "--lr", "0.05", "--output_dir", str(folder)]) == 0
    return os.path.join(str(folder), "checkpoint.pth")


def initial_network_checkpoint(checkpoint: str, folder) -> str:
    """A training checkpoint that holds, as its weights, the network `checkpoint`'s run started from."""
    args = eval_knn.build_parser().parse_args(["--pretrained_weights", checkpoint])
    initial, options, _ = weights.load_backbone(args, at_init=True)
    os.makedirs(folder)
    path = os.path.join(str(folder), "checkpoint.pth")
    torch.save(training_checkpoint(initial, options), path)
    return path


def test_init_baseline_with_per_slot_gives_each_slot_at_random_init(image_folder, tmp_path, capsys):
    """--init_baseline --per_slot: the per-slot numbers at init are those of a checkpoint that holds the run's initial
    network as its weights (the at-init rebuild checked against plain loading)."""
    checkpoint = trained_sparo_run(image_folder, tmp_path / "run")
    flags = [image_folder, *SMALL_IMAGES, "--nb_knn", "5", "--knn_backend", "torch", "--per_slot", "--slot_knn", "5"]
    capsys.readouterr()
    results = eval_knn.main(["--pretrained_weights", checkpoint, "--init_baseline", "--data_path", *flags])
    out = capsys.readouterr().out
    at_init = eval_knn.main(["--pretrained_weights", initial_network_checkpoint(checkpoint, tmp_path / "init"),
                             "--data_path", *flags])
    assert results["init_per_slot"]["top1"] == pytest.approx(at_init["per_slot"]["top1"])
    assert len(results["init_per_slot"]["top1"]) == 4 and "selected_slots" not in results
    assert "per-slot 5-NN Top1 at random init: best " in out


def test_init_baseline_needs_a_training_checkpoint(image_folder, tmp_path):
    plain = tmp_path / "backbone.pth"
    torch.save(sparo_vit.build_backbone(**SPARO_TINY).state_dict(), plain)
    flags = [f"--{key}={value}" for key, value in SPARO_TINY.items()]
    with pytest.raises(ValueError, match="needs a training checkpoint with its config"):
        eval_knn.main(["--pretrained_weights", str(plain), "--data_path", image_folder, *SMALL_IMAGES, *flags,
                       "--init_baseline"])
    with pytest.raises(ValueError, match="needs --pretrained_weights .* not --load_features"):
        eval_knn.main(["--load_features", str(tmp_path), "--init_baseline"])


def _overlapping_features(num_train=300, num_test=120, dim=64, slots=4):
    """Three classes that overlap enough for k-NN to err: accuracies far from 100 show changed neighbours."""
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(3, dim, generator=gen)
    train_labels, test_labels = torch.arange(num_train) % 3, torch.arange(num_test) % 3
    return feature_cache.FeatureSet(centers[train_labels] + torch.randn(num_train, dim, generator=gen) * 3,
                                    train_labels, centers[test_labels] + torch.randn(num_test, dim, generator=gen) * 3,
                                    test_labels, ["a", "b", "c"],
                                    {"kind": "sparo_encoding", "options": {"num_slots": slots}})


def test_results_record_where_the_search_really_ran(monkeypatch, capsys):
    """faiss-cpu with --use_cuda on a GPU rank: the JSON and the summary say faiss on the CPU, with one warning
    (the per-slot searches do not repeat it)."""
    monkeypatch.setattr(eval_knn.knn.faiss, "get_num_gpus", lambda: 0, raising=False)
    args = eval_knn.build_parser().parse_args(["--knn_backend", "faiss", "--nb_knn", "5", "--per_slot"])
    with pytest.warns(UserWarning, match="faiss has no GPU") as caught:
        results = eval_knn.run_knn(_overlapping_features(), args, torch.device("cuda", 1))
    assert len([w for w in caught if "faiss has no GPU" in str(w.message)]) == 1
    assert (results["backend"], results["device"], results["bank_dtype"]) == ("faiss", "cpu", "fp32")
    assert "k-NN search: faiss on cpu, fp32 bank" in eval_knn.summary_lines(results)


def test_fp16_bank_flag_gives_the_fp32_result():
    data = _overlapping_features()
    parse = eval_knn.build_parser().parse_args
    fp32 = eval_knn.run_knn(data, parse(["--nb_knn", "5", "20", "--per_slot", "--slot_knn", "5"]))
    fp16 = eval_knn.run_knn(data, parse(["--nb_knn", "5", "20", "--per_slot", "--slot_knn", "5",
                                         "--bank_dtype", "fp16"]))
    assert (fp16["backend"], fp16["bank_dtype"]) == ("torch", "fp16")  # auto: fp16 is a torch-backend bank
    assert 50 < fp32["knn"]["20"]["top1"] < 95
    assert fp16["knn"] == fp32["knn"] and fp16["per_slot"] == fp32["per_slot"]
    with pytest.raises(ValueError, match="--bank_dtype fp16 needs the torch backend"):
        eval_knn.run_knn(data, parse(["--knn_backend", "faiss", "--bank_dtype", "fp16"]))


# Runs an evaluation script (argv[1], then its flags) with every image of its train/val splits delayed by SLOW_S
# seconds in the loader workers, so that a signal lands while it extracts features or trains.
SLOW_EVALUATION = '''
import os, runpy, sys, time
from sparo_dino.eval import extraction


class Slow:
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        time.sleep(float(os.environ["SLOW_S"]))
        return self.dataset[index]


splits = extraction.build_splits
extraction.build_splits = lambda *args: tuple(Slow(split) for split in splits(*args))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def slow_evaluation(spawn, tmp_path, script: str, *flags: str, slow_s: float = 0.1):
    """`script` with `flags` in its own process group, its images delayed (SLOW_EVALUATION), 2 loader workers."""
    driver = tmp_path / "slow_evaluation.py"
    driver.write_text(SLOW_EVALUATION)
    return spawn([sys.executable, str(driver), os.path.join(REPO, script), *flags, "--num_workers", "2"],
                 cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "SLOW_S": str(slow_s)})


def live_processes_in_group(group: int) -> list[int]:
    """PIDs of the processes of a process group that are still running (zombies, which only await their reaper,
    are not counted)."""
    alive = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def assert_group_ends(group: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while live_processes_in_group(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_processes_in_group(group) == []


def test_sigterm_during_extraction_says_nothing_was_saved(image_folder, sparo_checkpoint, tmp_path, spawn):
    """scancel's SIGTERM to the whole job while eval_knn.py extracts features: the loader workers survive it, the
    main process ends them, says in one line that nothing was saved and how to go on, and exits 143 (before: a
    silent death by the signal)."""
    job = slow_evaluation(spawn, tmp_path, "eval_knn.py", "--pretrained_weights", sparo_checkpoint, "--data_path",
                          image_folder, "--resize_size", "32", "--crop_size", "32", "--batch_size_per_gpu", "4",
                          "--output_dir", str(tmp_path / "out"))
    assert job.wait_for("train features: 1/6"), job.text
    os.killpg(job.process.pid, signal.SIGTERM)
    assert job.wait_exit(timeout=60) == 128 + signal.SIGTERM == 143, job.text
    assert job.lines[-1] == ("stopped by SIGTERM: nothing was saved; run the same command again to start over\n"), \
        job.text
    assert "Traceback" not in job.text, job.text
    assert_group_ends(job.process.pid)


def test_a_results_file_cut_short_while_written_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    """write_results goes through a temporary name and a rename: a failure in the middle of the JSON (a kill, a full
    disk) leaves the earlier results whole for the scripts that parse them."""
    from sparo_dino.cli import eval_flags

    path = str(tmp_path / "results.json")
    eval_flags.write_results({"knn": {"20": {"top1": 70.0}}}, path)

    def cut_short(results, handle, **kwargs):
        handle.write('{"knn": ')
        raise OSError("No space left on device")

    monkeypatch.setattr(eval_flags.json, "dump", cut_short)
    with pytest.raises(OSError, match="No space left"):
        eval_flags.write_results({"knn": {"20": {"top1": 71.0}}}, path)
    assert json.loads(open(path).read()) == {"knn": {"20": {"top1": 70.0}}}
    assert os.listdir(tmp_path) == ["results.json"]  # no half file left beside it
