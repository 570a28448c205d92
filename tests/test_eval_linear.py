"""eval_linear.py end to end on generated images: both protocols learn, outputs are labelled and read like official
DINO's (best top-1 first, official validation epochs, --evaluate), resume is exact and continues where it stopped."""
from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from test_eval_knn import (
    SMALL_IMAGES,
    assert_group_ends,
    initial_network_checkpoint,
    slow_evaluation,
    trained_sparo_run,
    write_checkpoint,
)
from test_features import SPARO_TINY

import eval_linear
from sparo_dino import distributed
from sparo_dino.eval import linear_probe
from sparo_dino.eval.feature_cache import FeatureSet, load_features, save_features
from sparo_dino.io.checkpoint import CheckpointError

SUMMARY = re.compile(r"^Linear probe result \[(.+)\]: best Top1: ([\d.]+) \(epoch (\d+), Top5 ([\d.]+)\), "
                     r"final Top1: ([\d.]+), Top5: ([\d.]+)$", re.M)
BASELINE = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32}


def test_fast_mode_on_sparo_encoding_learns_and_says_it_is_fast(image_folder, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    results = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                                "--fast", "--epochs", "20", "--lr_grid", "25"])
    protocol, _, _, _, top1, _ = SUMMARY.search(capsys.readouterr().out).groups()
    assert protocol.startswith("FAST MODE") and "no augmentation" in protocol
    assert float(top1) >= 90.0
    folder = tmp_path / "run" / "linear_fast_checkpoint_teacher"
    saved = json.loads((folder / "results_linear.json").read_text())
    assert saved["run"]["protocol"] == "fast" and saved["run"]["kind"] == "sparo_encoding"
    assert saved["run"]["dim"] == 4 * 16 and saved["final"]["top1"] == results["final"]["top1"]
    log = [json.loads(line) for line in (folder / "log_linear.txt").read_text().splitlines()]
    assert [record["epoch"] for record in log] == list(range(20))
    assert log[0]["lr"] == pytest.approx(25 * 8 / 256)  # lr scaled by batch / 256, cosine from there
    assert log[-1]["lr"] < log[0]["lr"] / 50


def test_official_protocol_on_baseline_uses_last_four_cls_tokens(image_folder, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "base", BASELINE)
    results = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                                "--epochs", "4", "--lr", "25", "--output_dir", str(tmp_path / "probe")])
    protocol, _, _, _, top1, top5 = SUMMARY.search(capsys.readouterr().out).groups()
    assert protocol == "official protocol"
    assert results["run"]["kind"] == "cls_last4" and results["run"]["dim"] == 4 * 192
    assert float(top1) >= 80.0 and float(top5) == 100.0
    state = torch.load(tmp_path / "probe" / "checkpoint_linear.pth", weights_only=True)
    assert state["epoch"] == 4


def test_fast_mode_resumes_exactly_after_an_interruption(image_folder, tmp_path, monkeypatch, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    cache = str(tmp_path / "cache")
    flags = ["--fast", "--epochs", "4", "--lr_grid", "1", "--batch_size_per_gpu", "8"]
    whole = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                              "--dump_features", cache, *flags, "--output_dir", str(tmp_path / "whole")])

    real_train_epoch, calls = linear_probe.train_epoch, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and interrupt:
            raise KeyboardInterrupt  # killed during the third epoch
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(linear_probe, "train_epoch", counted)
    resumed_dir = str(tmp_path / "resumed")
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        eval_linear.main(["--load_features", cache, *flags, "--output_dir", resumed_dir])
    capsys.readouterr()
    interrupt, calls[:] = False, []
    resumed = eval_linear.main(["--load_features", cache, *flags, "--output_dir", resumed_dir])
    # the rerun continued after the 2 checkpointed epochs: it trained epochs 2 and 3 only, and said so
    assert len(calls) == 2
    assert f"resumed linear probe from {os.path.join(resumed_dir, 'checkpoint_linear.pth')} after epoch 2" in \
        capsys.readouterr().out
    log = [json.loads(line) for line in open(os.path.join(resumed_dir, "log_linear.txt"))]
    assert [record["epoch"] for record in log] == [0, 1, 2, 3]
    assert resumed["final"] == whole["final"] and resumed["best"] == whole["best"]
    whole_state = torch.load(tmp_path / "whole" / "checkpoint_linear.pth", weights_only=True)["classifier"]
    resumed_state = torch.load(os.path.join(resumed_dir, "checkpoint_linear.pth"), weights_only=True)["classifier"]
    for key in whole_state:
        assert torch.equal(whole_state[key], resumed_state[key])
    with pytest.raises(ValueError, match="belongs to another linear probe"):
        eval_linear.main(["--load_features", cache, *flags[:-2], "--batch_size_per_gpu", "4",
                          "--output_dir", resumed_dir])


@pytest.fixture
def feature_cache(image_folder, tmp_path):
    """Cached SPARO features of the generated images (own format), for fast probes without images or weights."""
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    cache = str(tmp_path / "cache")
    eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES, "--fast",
                      "--epochs", "1", "--dump_features", cache, "--output_dir", str(tmp_path / "first")])
    return cache


def test_validation_epochs_and_headline_are_official(feature_cache, tmp_path, capsys):
    """Official DINO validates when `epoch % val_freq == 0 or epoch == epochs - 1` (0-based) and reports the best
    top-1 ("Max accuracy so far"); the summary leads with it and keeps the final one."""
    results = eval_linear.main(["--load_features", feature_cache, "--fast", "--epochs", "5", "--val_freq", "3",
                                "--lr_grid", "0.5", "--output_dir", str(tmp_path / "probe"), "--local-rank=0",
                                "--dist_url", "env://"])
    out = capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "probe" / "log_linear.txt").read_text().splitlines()]
    validated = {record["epoch"]: record["val_top1"] for record in log if "val_top1" in record}
    assert sorted(validated) == [0, 3, 4]
    assert [int(e) for e in re.findall(r"^Accuracy at epoch (\d+) of the network on the 24 test images: ", out,
                                       re.M)] == [0, 3, 4]
    best_epoch = max(validated, key=lambda epoch: (validated[epoch], -epoch))  # first epoch with the highest top-1
    maxima = [float(v) for v in re.findall(r"^Max accuracy so far: ([\d.]+)%$", out, re.M)]
    assert maxima == pytest.approx([round(max(validated[e] for e in validated if e <= last), 2)
                                    for last in (0, 3, 4)], abs=0.006)
    _, best, epoch, _, final, _ = SUMMARY.search(out).groups()
    assert int(epoch) == best_epoch == results["best"]["epoch"]
    assert float(best) == pytest.approx(validated[best_epoch], abs=0.006)
    assert float(final) == pytest.approx(validated[4], abs=0.006)


def test_evaluate_validates_a_trained_head_without_training(feature_cache, tmp_path, capsys, monkeypatch):
    probe_dir = str(tmp_path / "probe")
    trained = eval_linear.main(["--load_features", feature_cache, "--fast", "--epochs", "3", "--lr_grid", "0.5",
                                "--output_dir", probe_dir])
    head = torch.load(os.path.join(probe_dir, "checkpoint_linear.pth"), weights_only=True)["classifier"]
    cached = load_features(feature_cache)
    logits = cached.val_features @ head["linear.weight"].T + head["linear.bias"]  # independent reference
    expected = 100.0 * (logits.argmax(1) == cached.val_labels).double().mean().item()
    capsys.readouterr()
    monkeypatch.setattr(linear_probe, "train_epoch", None)  # any training step would fail
    evaluated = eval_linear.main(["--load_features", feature_cache, "--fast", "--evaluate", "--output_dir", probe_dir,
                                  "--num_labels", "3"])
    assert evaluated["evaluate"]["top1"] == pytest.approx(expected) == pytest.approx(trained["final"]["top1"])
    assert f"Accuracy of the network on the 24 test images: {expected:.1f}%" in capsys.readouterr().out.splitlines()

    # official DINO's linear weights / checkpoint.pth.tar: the DDP classifier's state_dict
    official = tmp_path / "official_linear.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in head.items()}, "epoch": 3, "best_acc": 0.0}, official)
    from_official = eval_linear.main(["--load_features", feature_cache, "--fast", "--evaluate",
                                      "--linear_weights", str(official), "--output_dir", str(tmp_path / "elsewhere")])
    assert from_official["evaluate"]["top1"] == pytest.approx(expected)
    torch.save({"state_dict": {"module.linear.weight": head["linear.weight"][:2],
                               "module.linear.bias": head["linear.bias"][:2]}}, official)
    with pytest.raises(ValueError, match="the head in .* has .* these features need"):
        eval_linear.main(["--load_features", feature_cache, "--fast", "--evaluate", "--linear_weights", str(official)])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        eval_linear.main(["--load_features", feature_cache, "--fast", "--evaluate", "--output_dir",
                          str(tmp_path / "no_probe")])


def test_sparo_features_encoding_plus_cls_is_one_flag_away(feature_cache, image_folder, tmp_path):
    checkpoint = str(tmp_path / "run" / "checkpoint.pth")  # the weights feature_cache was computed from
    common = ["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES, "--fast",
              "--epochs", "1", "--output_dir", str(tmp_path / "probe")]
    plus = eval_linear.main([*common, "--sparo_features", "encoding+cls"])
    assert plus["run"]["kind"] == "cls_last3+sparo_encoding" and plus["run"]["dim"] == 3 * 192 + 4 * 16
    two = eval_linear.main([*common, "--sparo_features", "encoding+cls", "--n_last_blocks", "2",
                            "--output_dir", str(tmp_path / "probe2")])
    assert two["run"]["kind"] == "cls_last1+sparo_encoding" and two["run"]["dim"] == 192 + 4 * 16
    with pytest.raises(ValueError, match="are 'sparo_encoding', this evaluation needs 'cls_last3\\+sparo_encoding'"):
        eval_linear.main(["--load_features", feature_cache, "--fast", "--sparo_features", "encoding+cls"])
    baseline = write_checkpoint(tmp_path / "base", BASELINE)
    with pytest.raises(ValueError, match="--sparo_features encoding\\+cls applies to read-outs that replace"):
        eval_linear.main([*common[:1], baseline, *common[2:], "--sparo_features", "encoding+cls"])


def test_flags_that_do_not_apply_are_errors(image_folder, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    common = ["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES, "--epochs", "1"]
    with pytest.raises(ValueError, match="--n_last_blocks/--avgpool_patchtokens apply to CLS archs"):
        eval_linear.main([*common, "--n_last_blocks", "4"])
    with pytest.raises(ValueError, match="need --fast"):
        eval_linear.main([*common, "--dump_features", str(tmp_path / "cache")])
    with pytest.raises(ValueError, match="--num_labels 1000 does not match the 3 classes of the data"):
        eval_linear.main([*common, "--num_labels", "1000"])
    with pytest.raises(ValueError, match="--linear_weights is read by --evaluate only"):
        eval_linear.main([*common, "--linear_weights", checkpoint])
    with pytest.raises(ValueError, match="--dist_url file:///tmp/x is not supported"):
        eval_linear.main([*common, "--dist_url", "file:///tmp/x"])
    official_dump = tmp_path / "official_dump"
    official_dump.mkdir()
    for name, tensor in (("trainfeat", torch.eye(3)), ("testfeat", torch.eye(3)), ("trainlabels", torch.arange(3)),
                         ("testlabels", torch.arange(3))):
        torch.save(tensor, official_dump / f"{name}.pth")
    with pytest.raises(ValueError, match="holds an official DINO dump .* needs the raw features"):
        eval_linear.main(["--load_features", str(official_dump), "--fast", "--epochs", "1"])


def test_fast_lr_grid_trains_every_head_in_one_pass_and_chooses_on_a_train_holdout(feature_cache, tmp_path, capsys,
                                                                                    monkeypatch):
    """Each head of the grid equals a single probe trained alone at its lr on the same batches; the reported head
    is the one with the best hold-out top-1 (the test set never picks), and --evaluate reads it back."""
    calls = []
    real_train_epoch = linear_probe.train_epoch
    monkeypatch.setattr(linear_probe, "train_epoch", lambda *a, **k: calls.append(1) or real_train_epoch(*a, **k))
    grid = ["0.001", "0.1", "10"]
    results = eval_linear.main(["--load_features", feature_cache, "--fast", "--epochs", "3", "--lr_grid", *grid,
                                "--batch_size_per_gpu", "8", "--holdout_fraction", "0.25",
                                "--output_dir", str(tmp_path / "grid")])
    out = capsys.readouterr().out
    assert len(calls) == 3  # one pass per epoch for all heads
    chosen = results["lr_grid"]["chosen"]
    assert results["lr_grid"]["lrs"] == pytest.approx([float(lr) * 8 / 256 for lr in grid])
    holdout = results["lr_grid"]["holdout_top1"]
    assert chosen == holdout.index(max(holdout))
    assert f"lr {results['lr_grid']['chosen_lr']:g} chosen among 3 on a 0.25 train hold-out" in out

    # reference: the chosen head alone, trained with its own optimizer on the same 75% of the train features
    data = load_features(feature_cache)
    order = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))
    kept = order[round(0.25 * len(order)):].sort().values
    torch.manual_seed(0)
    heads = linear_probe.LinearHeads(data.train_features.shape[1], data.num_classes, [1.0] * 3)
    single = heads.heads[chosen]  # same init as the grid's head: the grid draws its heads in this order
    optimizer = torch.optim.SGD(single.parameters(), lr=results["lr_grid"]["chosen_lr"], momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3, eta_min=0.0)
    for epoch in range(3):
        generator = torch.Generator().manual_seed(epoch)
        for x, y in linear_probe.tensor_batches(data.train_features[kept], data.train_labels[kept], 8, generator):
            loss = torch.nn.functional.cross_entropy(single(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    logits = single(data.val_features)
    top1 = 100.0 * float((logits.argmax(1) == data.val_labels).float().mean())
    assert results["final"]["top1"] == pytest.approx(top1, abs=1e-6)
    evaluated = eval_linear.main(["--load_features", feature_cache, "--fast", "--evaluate",
                                  "--output_dir", str(tmp_path / "grid")])
    assert evaluated["evaluate"]["top1"] == pytest.approx(top1, abs=1e-6)
    with pytest.raises(ValueError, match="--fast trains one head per --lr_grid value"):
        eval_linear.main(["--load_features", feature_cache, "--fast", "--lr", "0.5"])


def test_init_baseline_is_the_same_probe_on_the_runs_initial_network(image_folder, tmp_path, capsys):
    """--fast --init_baseline: the trained probe is unchanged, and the baseline equals a fast probe (same lr grid and
    hold-out) of a checkpoint that holds the run's initial network as its weights; one line gives the difference."""
    checkpoint = trained_sparo_run(image_folder, tmp_path / "run")
    probe = ["--data_path", image_folder, *SMALL_IMAGES, "--fast", "--epochs", "3", "--lr_grid", "0.1", "10",
             "--holdout_fraction", "0.25"]
    capsys.readouterr()
    results = eval_linear.main(["--pretrained_weights", checkpoint, *probe, "--init_baseline"])  # default folder
    out = capsys.readouterr().out
    alone = eval_linear.main(["--pretrained_weights", checkpoint, *probe, "--output_dir", str(tmp_path / "alone")])
    assert results["final"] == alone["final"] and results["lr_grid"] == alone["lr_grid"]

    at_init = eval_linear.main(["--pretrained_weights", initial_network_checkpoint(checkpoint, tmp_path / "init"),
                                *probe, "--output_dir", str(tmp_path / "i")])
    assert results["init_baseline"]["final"] == at_init["final"]
    assert results["init_baseline"]["lr_grid"] == at_init["lr_grid"]
    assert results["init_baseline"]["run"]["at_init"] is True
    folder = tmp_path / "run" / "linear_fast_checkpoint_teacher"
    assert (folder / eval_linear.INIT_BASELINE_DIR / linear_probe.CHECKPOINT_NAME).exists()
    gain = results["final"]["top1"] - at_init["final"]["top1"]
    assert ("Linear probe at random init (same arch, seed and images) [FAST MODE" in out
            and f"final Top1: {at_init['final']['top1']:.2f}" in out and f"trained minus init: {gain:+.2f}" in out)
    saved = json.loads((folder / "results_linear.json").read_text())
    assert saved["init_baseline"]["final"]["top1"] == at_init["final"]["top1"]


@pytest.mark.parametrize("flags", [[], ["--fast", "--evaluate"], ["--fast", "--load_features", "x"]])
def test_init_baseline_needs_fast_training_from_a_checkpoint(flags, image_folder, tmp_path):
    with pytest.raises(ValueError, match="--init_baseline needs --fast training from --pretrained_weights"):
        eval_linear.main(["--pretrained_weights", "x", "--data_path", image_folder, *flags, "--init_baseline"])


def test_fast_mode_keeps_features_in_host_memory_and_moves_one_batch_per_step(tmp_path):
    """The device holds the heads and a batch, not the whole bank (21 GB for ImageNet x SPARO): on a "meta" device
    every batch still comes from host memory, ready to move when its step runs."""
    gen = torch.Generator().manual_seed(0)
    cache = str(tmp_path / "cache")
    save_features(FeatureSet(
        torch.randn(40, 8, generator=gen), torch.arange(40) % 3, torch.randn(12, 8, generator=gen),
        torch.arange(12) % 3, ["a", "b", "c"], {"kind": "sparo_encoding", "options": dict(SPARO_TINY), "tag": "t"}),
        cache)
    args = eval_linear.build_parser().parse_args(["--load_features", cache, "--fast", "--batch_size_per_gpu", "8"])
    probe = eval_linear.fast_probe(args, distributed.DistInfo(0, 1, 0, torch.device("meta")))
    assert next(probe.classifier.parameters()).device.type == "meta"
    for batches in (probe.train_batches(0), probe.holdout_batches(), probe.val_batches()):
        inputs, labels = next(iter(batches))
        assert (inputs.device.type, labels.device.type) == ("cpu", "cpu")


def test_a_probe_of_another_run_in_the_output_folder_names_the_keys_that_differ(tmp_path):
    """Before: both whole run records (two dicts of about 400 characters each) in one line."""
    run = {"protocol": "fast", "kind": "sparo_encoding", "dim": 64, "num_classes": 3, "tag": "checkpoint_teacher",
           "epochs": 100, "lr": 0.001, "total_batch_size": 256,
           "options": {"arch": "vit_tiny_sparo", "patch_size": 8, "num_slots": 4}}
    other = {**run, "epochs": 10, "options": {**run["options"], "num_slots": 8}}
    head = linear_probe.LinearClassifier(64, 3)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    path = str(tmp_path / linear_probe.CHECKPOINT_NAME)
    torch.save({"classifier": head.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": 3, "run": other}, path)
    with pytest.raises(ValueError) as info:
        linear_probe._resume(path, run, head, optimizer, scheduler)
    assert str(info.value) == (f"{path} belongs to another linear probe: epochs=10 (this probe: 100); "
                               "options.num_slots=8 (this probe: 4); use another --output_dir (or remove the file "
                               "to start over)")


def test_negative_lr_is_an_error(capsys):
    """Before: the official protocol trained with a negative learning rate."""
    with pytest.raises(ValueError, match="--lr and --lr_grid values must be > 0"):
        eval_linear.main(["--lr", "-0.001", "--pretrained_weights", "x.pth", "--data_path", "d"])


def test_sigterm_during_the_probe_names_its_checkpoint_and_the_rerun_continues(image_folder, tmp_path, spawn,
                                                                                capsys):
    """SIGTERM to the whole job in the official probe's second epoch: one line names the checkpoint of the first
    epoch and says to run the same command again, exit 143, no process left; the rerun continues from epoch 1
    (before: a silent death by the signal)."""
    checkpoint = write_checkpoint(tmp_path / "base", BASELINE)
    flags = ["--pretrained_weights", checkpoint, "--data_path", image_folder, "--resize_size", "32", "--crop_size",
             "32", "--batch_size_per_gpu", "8", "--epochs", "3", "--output_dir", str(tmp_path / "probe")]
    job = slow_evaluation(spawn, tmp_path, "eval_linear.py", *flags)
    assert job.wait_for('{"epoch": 0'), job.text  # printed after the epoch's checkpoint
    os.killpg(job.process.pid, signal.SIGTERM)
    assert job.wait_exit(timeout=60) == 143, job.text
    saved = tmp_path / "probe" / linear_probe.CHECKPOINT_NAME
    assert job.lines[-1] == (f"stopped by SIGTERM: saved the linear probe's checkpoint {saved} (1 of 3 epochs); "
                             "run the same command again to continue from there\n"), job.text
    assert "Traceback" not in job.text, job.text
    assert_group_ends(job.process.pid)
    eval_linear.main([*flags, "--num_workers", "0"])
    assert f"resumed linear probe from {saved} after epoch 1" in capsys.readouterr().out
