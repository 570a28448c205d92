"""Read-outs side by side: the same ViT-Tiny trunk, recipe and budget with each read-out, several seeds, one table.

    python -m experiments.reproduce --profile cpu|cpu16|gpu [--output_dir runs/reproduce] [--seeds 0 1 2]
        [--variants ...] [--lr_sweep 0.5 1 2] [--max_seeds 5] [--from_record]

Whether SPARO helps is a claim about the read-out, so every other thing is held fixed: the trunk (vit_tiny), the
DINO recipe and budget of the profile, the images and both evaluations (weighted 20-NN and the fast linear probe,
each next to the same network at its random init, each also at 192 principal components fitted on the train split:
the cls width). Both evaluations and both widths read one extraction of the trained and one of the random-init
network. The raw pixels get the same evaluations.

Equal tuning: every row trains at 3 learning rates (--lr_sweep, times the profile's) at the first seed, and the lr
whose linear probe scores best on its train hold-out (never the test images) is used for all seeds of the row.
Statistics (experiments/readout_stats.py): Welch's t-test for each comparison the table makes, Holm's correction
across them, and every row in a comparison with p in (0.01, 0.2) gets seeds up to --max_seeds.

Each finished (variant, lr, seed) is saved as JSON in the output folder and skipped on a rerun (an interrupted
training resumes from its checkpoint, an interrupted probe from its own), so the script can be stopped and started
again; every finished run also appends a row to the run record in docs/readouts.md, from which --from_record
rebuilds a profile's tables and figure without training. The tables (docs/readouts.md, between the profile's
markers) and the figure (docs/readouts_fmnist_<profile>.png) are rewritten from all finished runs at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import yaml

import eval_knn
import eval_linear
import sparo_vit
from experiments import demo, readout_stats
from sparo_dino.cli import errors as cli_errors
from sparo_dino.cli import eval_flags
from sparo_dino.cli.config import parse_args as parse_flags
from sparo_dino.cli.train_flags import get_args_parser
from sparo_dino.data import datasets
from sparo_dino.eval.feature_cache import FeatureSet
from sparo_dino.io import atomic, provenance
from sparo_dino.io import checkpoint as checkpoints
from sparo_dino.train.progress import LOG_NAME
from sparo_dino.train.schedules import scaled_lr

TRUNK = "vit_tiny"
CONFIG = demo.CONFIGS[TRUNK]  # every variant starts from the baseline recipe; --arch and read-out flags on top
DOCS_DIR = demo.REPO_ROOT / "docs"
DOC_NAME = "readouts.md"
# The paper's DINO setting of SPARO beside L; written out so the table states what ran, whatever the defaults.
SPARO_SIZES = {"slot_dim": 64, "attn_dim": 64, "group_size": 1}
PCA_DIM = 192  # the width control: every encoding also evaluated at the cls width (vit_tiny's 192)
KNN_K = 20
DEFAULT_SWEEP = (0.5, 1.0, 2.0)  # --lr_sweep: multiples of the profile's lr


def as_flags(options: Mapping[str, int | bool]) -> tuple[str, ...]:
    return tuple(part for key, value in options.items()
                 for part in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: a read-out of the vit_tiny trunk and the main_dino.py flags that set its options."""
    name: str
    arch: str
    flags: tuple[str, ...] = ()


MHMIX_SIZES = {"slot_dim": 64, "attn_dim": 64}


def _variants(*variants: Variant) -> dict[str, Variant]:
    return {variant.name: variant for variant in variants}


VARIANTS = _variants(
    Variant("cls", TRUNK),
    Variant("gap", f"{TRUNK}_gap"),
    Variant("attpool", f"{TRUNK}_attpool"),
    # L learned queries, each through a full-width 3-head attention; slots never mix (not Tab. 6's multi-head)
    Variant("mhca", f"{TRUNK}_mhca", as_flags({"num_slots": 64, "slot_dim": 64})),
    Variant("sparo", f"{TRUNK}_sparo", as_flags({"num_slots": 64, **SPARO_SIZES})),
    # Tab. 6: separate heads with slot-wise LayerNorm and projection, against the same with the heads mixed by an
    # output projection (mhmix), and mixed heads with LayerNorm and projection over the whole output (mhmix_full)
    Variant("sparo_ln", f"{TRUNK}_sparo", as_flags({"num_slots": 64, **SPARO_SIZES, "slot_norm": True})),
    Variant("mhmix", f"{TRUNK}_mhmix", as_flags({"num_slots": 64, **MHMIX_SIZES, "slot_wise": True})),
    Variant("mhmix_full", f"{TRUNK}_mhmix", as_flags({"num_slots": 64, **MHMIX_SIZES, "slot_wise": False})),
    # width-matched: 3 slots of 64 give the cls width, 192
    Variant("sparo_w3", f"{TRUNK}_sparo", as_flags({"num_slots": 3, **SPARO_SIZES})),
    Variant("mhmix_w3", f"{TRUNK}_mhmix", as_flags({"num_slots": 3, **MHMIX_SIZES, "slot_wise": True})),
    Variant("mhmix_full_w3", f"{TRUNK}_mhmix", as_flags({"num_slots": 3, **MHMIX_SIZES, "slot_wise": False})),
)
MATCHED = "sparo_matched"  # SPARO with L chosen so that its read-out holds as many parameters as cls's last block
VARIANT_NAMES = (*list(VARIANTS)[:5], MATCHED, *list(VARIANTS)[5:])
REFERENCES = ("cls", "sparo")  # every row is compared with these
# The 5-seed rule runs for the comparisons with SPARO only (the question is whether SPARO beats each alternative):
# on 2 cores, the rule for every comparison would not fit two sessions (docs/readouts.md, "Time and size"). Other
# undecided comparisons stay at 3 seeds and their verdict says so.
SEED_RULE_ROW = "sparo"


@dataclasses.dataclass(frozen=True)
class Profile:
    """A training profile plus the linear probe's epochs (the same for every row)."""
    name: str
    train: demo.Profile
    linear_epochs: int
    tokens: str  # what a training crop holds, for the page
    variants: tuple[str, ...] = VARIANT_NAMES  # the rows a plain run of the profile trains


def _with_flag(flags: tuple[str, ...], flag: str, value: str) -> tuple[str, ...]:
    """`flags` with `flag`'s value replaced (it must be there)."""
    index = flags.index(flag)
    return (*flags[:index + 1], value, *flags[index + 2:])


PROFILES = {
    # The demo's CPU recipe (docs/demo_recipes.md): 640 steps of 32 on 4096 images, patch 8 on 16 px crops, so a
    # training crop holds 2 x 2 patches + CLS = 5 tokens (the 32 px evaluation view 17). The small-token case.
    "cpu": Profile("cpu", demo.PROFILES["cpu"], linear_epochs=30, tokens="5 (patch 8 on 16 px crops)"),
    # The same recipe on 32 px crops: 4 x 4 patches + CLS = 17 tokens in training, as in the evaluation view. A step
    # costs 2-3x a 16 px one, so 2 epochs (256 steps, one of warmup) instead of 5, for the whole comparison to fit
    # two working sessions on 2 cores (docs/readouts.md, "Time and size"); no checkpointNNNN.pth copies (disk).
    "cpu16": Profile("cpu16", dataclasses.replace(demo.PROFILES["cpu"], name="cpu16", epochs=2, flags=(*_with_flag(
        demo.PROFILES["cpu"].flags, "--global_crop_size", "32"), "--saveckp_freq", "0")), linear_epochs=30,
        tokens="17 (patch 8 on 32 px crops)", variants=tuple(name for name in VARIANT_NAMES if name != MATCHED)),
    # The demo's GPU profile: all 60k / 10k images, 10 epochs of 256 with 6 local crops, the config's recipe.
    "gpu": Profile("gpu", demo.PROFILES["gpu"], linear_epochs=100,
                   tokens="65 (patch 4 on 32 px crops; 6 local crops of 16 px)"),
}


def profile_lr(profile: Profile) -> float:
    """The base lr a profile trains with: its own --lr flag, else the config's."""
    flags = profile.train.flags
    if "--lr" in flags:
        return float(flags[flags.index("--lr") + 1])
    return float(yaml.safe_load(CONFIG.read_text())["lr"])


# ----------------------------------------------------------------------------------------------- read-out sizes
def readout_parameters(arch: str, **options: int) -> int:
    """Parameters of a read-out (what sits on the N-1 shared trunk blocks), built on the meta device: no memory,
    no init, only shapes."""
    with torch.device("meta"):
        return sparo_vit.build_backbone(arch, **options).readout_parameter_count()


def closest_num_slots(target: int, count: Callable[[int], int], step: int = 1) -> int:
    """The L (a multiple of `step`, the group size) whose read-out size `count(L)` is closest to `target`; ties go
    to the smaller L. `count` grows with L, so a doubling and bisection need O(log L) builds."""
    high = step
    while count(high) < target:
        high *= 2
    low = step  # invariant: count(high) >= target; search multiples of step in [low, high]
    while high - low > step:
        middle = (low + high) // (2 * step) * step
        if count(middle) >= target:
            high = middle
        else:
            low = middle
    below = max(step, high - step)
    return below if abs(count(below) - target) <= abs(count(high) - target) else high


def matched_variant() -> Variant:
    """SPARO (V = D = 64, g = 1) with the L whose read-out size is closest to the vit_tiny block it replaces."""
    block = readout_parameters(TRUNK)
    sparo = VARIANTS["sparo"]

    def count(num_slots: int) -> int:
        return readout_parameters(sparo.arch, num_slots=num_slots, **SPARO_SIZES)

    num_slots = closest_num_slots(block, count)
    print(f"[reproduce] {MATCHED}: L = {num_slots}, read-out {count(num_slots):,} parameters; the {TRUNK} block it "
          f"replaces {block:,} (L = 64: {count(64):,})", flush=True)
    return Variant(MATCHED, sparo.arch, as_flags({"num_slots": num_slots, **SPARO_SIZES}))


def resolve_variants(names: Sequence[str]) -> list[Variant]:
    """The variants named, with sparo_matched's L computed; an arch this checkout lacks is an error up front."""
    variants = [matched_variant() if name == MATCHED else VARIANTS[name] for name in names]
    missing = [variant.arch for variant in variants if variant.arch not in sparo_vit.ARCHS]
    if missing:
        raise ValueError(f"arch(s) {', '.join(missing)} not in this checkout's sparo_vit.ARCHS; choose --variants "
                         f"among those it has")
    return variants


def network_sizes(config: Mapping[str, Any]) -> dict[str, int]:
    """Encoding width and parameter counts (backbone, read-out, DINO head) of a run config, on the meta device."""
    with torch.device("meta"):
        backbone = sparo_vit.build_backbone(**sparo_vit.backbone_kwargs(config))
        head = sparo_vit.DINOHead(backbone.num_features, config["out_dim"], use_bn=config["use_bn_in_head"],
                                  norm_last_layer=config["norm_last_layer"])
    return {"encoding_dim": backbone.num_features, "total_params": sum(p.numel() for p in backbone.parameters()),
            "readout_params": backbone.readout_parameter_count(),
            "head_params": sum(p.numel() for p in head.parameters())}


# ---------------------------------------------------------------------------------------------------- evaluation
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extract(checkpoint: Path, data_path: str, num_workers: int, at_init: bool) -> FeatureSet:
    """The features k-NN reads (the encoding; for cls the final-norm CLS of the last block) of a run's teacher or of
    the same network at its random init, once: both evaluations and both widths read them. In batches of the
    evaluations' default (128), as eval_linear.py extracts them: float sums depend on the batch, and a probe's
    choice among close heads can follow them."""
    args = eval_knn.build_parser().parse_args(["--pretrained_weights", str(checkpoint), "--data_path", data_path,
                                               *demo.EVAL_FLAGS, "--num_workers", str(num_workers)])
    return eval_flags.compute_features(args, device(), eval_knn.kind_resolver(args), at_init=at_init)


def evaluate(features: FeatureSet, seed: int, linear_epochs: int, output_dir: Path) -> dict[str, float]:
    """Weighted 20-NN and the fast linear probe (the default lr grid, chosen on a 10% train hold-out) of one set of
    features, at full width and at PCA_DIM principal components fitted on train: {"knn_top1", "linear_top1",
    "linear_holdout_top1", "pca_knn_top1", ...}. The probes resume from `output_dir`."""
    results = {}
    for prefix, pca_dim in (("", None), ("pca_", PCA_DIM)):
        data = eval_flags.reduce_width(features, pca_dim)
        knn_args = eval_knn.build_parser().parse_args(["--nb_knn", str(KNN_K)])
        knn = eval_knn.run_knn(data, knn_args, device())["knn"][str(KNN_K)]
        probe_args = eval_linear.build_parser().parse_args([
            "--fast", "--epochs", str(linear_epochs), "--seed", str(seed),
            "--output_dir", str(output_dir / f"linear{'_pca' if pca_dim else ''}")])
        probe = eval_linear.probe_on_features(probe_args, data, device())
        os.makedirs(probe.output_dir, exist_ok=True)
        linear = eval_linear.train(probe_args, probe)
        grid = linear["lr_grid"]
        results.update({f"{prefix}knn_top1": knn["top1"], f"{prefix}linear_top1": linear["final"]["top1"],
                        f"{prefix}linear_holdout_top1": grid["holdout_top1"][grid["chosen"]],
                        f"{prefix}linear_lr": grid["chosen_lr"]})
    return results


# ------------------------------------------------------------------------------------------ one (variant, seed)
def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}_lr{lr:g}_seed{seed}"


def run_path(output_dir: Path, variant: str, lr: float, seed: int) -> Path:
    return output_dir / f"{run_name(variant, lr, seed)}.json"


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Written to a temporary name, then renamed: a kill never leaves a half file that a rerun would skip on."""
    with atomic.replaced(path) as handle:
        json.dump(data, handle, indent=2)


def run_flags(variant: Variant, seed: int, lr: float) -> tuple[str, ...]:
    """main_dino.py flags of one run on top of the config and the profile."""
    return ("--arch", variant.arch, *variant.flags, "--lr", f"{lr:g}", "--seed", str(seed))


def finished_run(path: Path, variant: Variant, seed: int, lr: float) -> dict[str, Any]:
    """A finished run's record, refused when it was trained with other flags than the variant has now (e.g. another
    matched L after a change to the read-out sizes): a row must not mix two settings."""
    record = json.loads(path.read_text())
    if record["flags"] != list(run_flags(variant, seed, lr)):
        raise ValueError(f"{path} was trained with {' '.join(record['flags'])}, {variant.name} is now "
                         f"{' '.join(run_flags(variant, seed, lr))}: remove it (or use another --output_dir) to run "
                         "it again")
    return record


def training_log(train_dir: Path) -> tuple[float, int, float | None]:
    """Seconds spent in training epochs, the number of epochs and the last epoch's teacher entropy (nats), from the
    run's log.txt (kept across resumes)."""
    records = [json.loads(line) for line in (train_dir / LOG_NAME).read_text().splitlines() if line.strip()]
    return (sum(record["epoch_time_s"] for record in records), len(records),
            records[-1].get("train_teacher_entropy") if records else None)


def run_one(variant: Variant, seed: int, lr: float, profile: Profile, data_path: str, output_dir: Path,
            num_workers: int) -> dict[str, Any]:
    """Train one (variant, lr, seed), evaluate it and its random init (evaluate) and return its record."""
    run_dir = output_dir / run_name(variant.name, lr, seed)
    flags = run_flags(variant, seed, lr)
    checkpoint = demo.train(run_dir / "train", profile.train, data_path, CONFIG, num_workers, flags)
    trained = time.time()
    features = extract(checkpoint, data_path, num_workers, at_init=False)
    scores = evaluate(features, seed, profile.linear_epochs, run_dir)
    initial = initial_scores(variant, seed, profile, checkpoint, data_path, output_dir, num_workers)
    evaluated = time.time()
    config = checkpoints.load_checkpoint(str(checkpoint))["config"]
    epoch_seconds, epochs, entropy = training_log(run_dir / "train")
    num_train = len(datasets.build_dataset("fashion_mnist", data_path, split="train"))
    batch = profile.train.batch_size
    images = epochs * (num_train // batch) * batch  # the training loader drops the last incomplete batch
    return {"variant": variant.name, "arch": variant.arch, "seed": seed, "lr": lr, "profile": profile.name,
            "flags": list(flags), "feature_kind": features.meta["kind"], **scores, **at_init(initial),
            **network_sizes(config), "teacher_entropy": entropy, "out_dim": config["out_dim"],
            "images_per_s": images / epoch_seconds, "train_seconds": epoch_seconds, "eval_seconds": evaluated - trained,
            "num_train": num_train, "num_test": len(datasets.build_dataset("fashion_mnist", data_path, split="val")),
            "machine": provenance.machine(), "date": datetime.date.today().isoformat()}


def initial_scores(variant: Variant, seed: int, profile: Profile, checkpoint: Path, data_path: str,
                   output_dir: Path, num_workers: int) -> dict[str, float]:
    """Both evaluations of the network a run started from. The init depends on the read-out and the seed, not the
    lr, so the lrs of a sweep share one evaluation: the first run computes it, the others read
    `init/<variant>_seed<N>.json` (which names the flags it holds for; a folder of its own, not a run record)."""
    path = output_dir / "init" / f"{variant.name}_seed{seed}.json"
    flags = [*variant.flags, "--seed", str(seed)]
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["arch"] == variant.arch and cached["flags"] == flags:
            return cached["scores"]
    scores = evaluate(extract(checkpoint, data_path, num_workers, at_init=True), seed, profile.linear_epochs,
                      output_dir / "init" / f"{variant.name}_seed{seed}")
    write_json({"arch": variant.arch, "flags": flags, "scores": scores}, path)
    return scores


def at_init(scores: Mapping[str, float]) -> dict[str, float]:
    """The random-init network's scores under the record's names: knn_top1 -> knn_init_top1, linear_lr ->
    linear_init_lr (its hold-out score chooses nothing and is not kept)."""
    return {key.replace("_top1", "_init_top1").replace("_lr", "_init_lr"): value for key, value in scores.items()
            if "holdout" not in key}


def raw_pixels(output_dir: Path, data_path: str, linear_epochs: int) -> dict[str, float]:
    """The raw pixels through both evaluations at both widths (probe seed 0), computed once per output folder."""
    path = output_dir / "raw_pixels.json"
    if path.exists():
        scores = json.loads(path.read_text())
        if "linear_top1" in scores:  # an older folder holds the 20-NN alone
            return scores
    scores = evaluate(demo.raw_pixels(data_path), 0, linear_epochs, output_dir / "raw_pixels")
    write_json(scores, path)
    return scores


# ------------------------------------------------------------------------------------------------------ lr sweep
def sweep_lrs(profile: Profile, multiples: Sequence[float]) -> list[float]:
    """The lrs of the sweep: multiples of the profile's lr (rounded to 4 significant digits, as the names show)."""
    base = profile_lr(profile)
    return sorted({float(f"{base * multiple:.4g}") for multiple in multiples})


def chosen_lr(records: Iterable[Mapping[str, Any]], variant: str, seed: int, default: float) -> float | None:
    """The lr of `variant` whose run at `seed` scored best on the linear probe's train hold-out (the test images
    choose nothing); a tie goes to the lr nearest the profile's. None until a swept run of it has finished."""
    swept = [record for record in records if record["variant"] == variant and record["seed"] == seed
             and "linear_holdout_top1" in record]
    if not swept:
        return None
    best = max(swept, key=lambda r: (r["linear_holdout_top1"], -abs(math.log(r["lr"] / default)), -r["lr"]))
    return best["lr"]


# ---------------------------------------------------------------------------------------------------- statistics
@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean over seeds, the sample standard deviation and the standard error of the mean (None for one seed)."""
    mean: float
    std: float | None
    se: float | None
    n: int


def summarize(values: Sequence[float]) -> Stat:
    if len(values) < 2:
        return Stat(float(values[0]), None, None, len(values))
    std = statistics.stdev(values)
    return Stat(statistics.fmean(values), std, std / math.sqrt(len(values)), len(values))


METRICS = ("knn_top1", "knn_init_top1", "knn_gain", "linear_top1", "linear_init_top1", "linear_gain",
           "pca_knn_top1", "pca_knn_init_top1", "pca_linear_top1", "pca_linear_init_top1",
           "images_per_s", "train_minutes", "eval_minutes")
# What the comparisons test, with its label: trained top-1 and gain over init at full width, top-1 at PCA_DIM.
TESTED = (("knn_top1", "20-NN"), ("linear_top1", "linear"), ("knn_gain", "20-NN gain over init"),
          ("linear_gain", "linear gain over init"), ("pca_knn_top1", f"20-NN @{PCA_DIM}"),
          ("pca_linear_top1", f"linear @{PCA_DIM}"))


def metric_values(record: Mapping[str, Any]) -> dict[str, float]:
    """A run's numbers as the table shows them (gains over random init are per seed, then averaged); a number the
    run did not measure (older runs: PCA) is left out."""
    values = {key: record[key] for key in METRICS if record.get(key) is not None}
    for evaluation in ("knn", "linear"):
        values[f"{evaluation}_gain"] = record[f"{evaluation}_top1"] - record[f"{evaluation}_init_top1"]
    values.update(images_per_s=record["images_per_s"], train_minutes=record["train_seconds"] / 60,
                  eval_minutes=record["eval_seconds"] / 60)
    return values


def row_records(records: Sequence[Mapping[str, Any]], lrs: Mapping[str, float | None]
                ) -> dict[str, list[Mapping[str, Any]]]:
    """variant -> its runs at its chosen lr (all its runs when it has no choice), seed order; table order."""
    rows: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if lrs.get(record["variant"]) in (None, record["lr"]):
            rows.setdefault(record["variant"], []).append(record)
    order = sorted(rows, key=lambda n: VARIANT_NAMES.index(n) if n in VARIANT_NAMES else len(VARIANT_NAMES))
    return {name: sorted(rows[name], key=lambda record: record["seed"]) for name in order}


def summarize_runs(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """variant -> per metric its per-seed values and Stat, plus the facts every seed shares (arch, flags, sizes)."""
    summaries = {}
    for name, runs in rows.items():
        values = [metric_values(record) for record in runs]
        series = {metric: [v[metric] for v in values if metric in v] for metric in METRICS}
        summaries[name] = {"values": series, "stats": {m: summarize(v) for m, v in series.items() if v},
                           "seeds": [record["seed"] for record in runs], "lr": runs[0]["lr"],
                           **{key: runs[0].get(key) for key in ("arch", "flags", "encoding_dim", "readout_params",
                                                                "total_params", "head_params")}}
    return summaries


@dataclasses.dataclass(frozen=True)
class Comparison:
    row: str
    reference: str
    metric: str
    test: readout_stats.Welch
    adjusted_p: float | None = None


def comparisons(summaries: Mapping[str, Mapping[str, Any]]) -> list[Comparison]:
    """Every row against each reference present (each pair once), on every tested metric both measured; Holm's
    correction across all of them (the family of the table's verdicts)."""
    pairs = []
    for reference in REFERENCES:
        if reference not in summaries:
            continue
        for row in summaries:
            if row != reference and (row, reference) not in pairs and (reference, row) not in pairs:
                pairs.append((row, reference))
    tests = [Comparison(row, reference, metric, readout_stats.welch(summaries[row]["values"][metric],
                                                                    summaries[reference]["values"][metric]))
             for row, reference in pairs for metric, _ in TESTED
             if summaries[row]["values"][metric] and summaries[reference]["values"][metric]]
    tested = [index for index, comparison in enumerate(tests) if comparison.test.p is not None]
    adjusted = readout_stats.holm([tests[index].test.p for index in tested])
    for index, p in zip(tested, adjusted):
        tests[index] = dataclasses.replace(tests[index], adjusted_p=p)
    return tests


def rows_needing_seeds(tests: Sequence[Comparison], summaries: Mapping[str, Mapping[str, Any]],
                       max_seeds: int) -> list[str]:
    """The driver's rule: both rows of a comparison with SEED_RULE_ROW whose p lies in readout_stats.UNDECIDED run up
    to `max_seeds` seeds (rows that have them already are not listed)."""
    names = {name for test in tests if readout_stats.undecided(test.test) and SEED_RULE_ROW in (test.row,
                                                                                                test.reference)
             for name in (test.row, test.reference)}
    return [name for name in summaries if name in names and len(summaries[name]["seeds"]) < max_seeds]


# ------------------------------------------------------------------------------------------------------- output
def cell(stat: Stat | None, digits: int = 2) -> str:
    if stat is None:
        return "not measured yet"
    if stat.std is None:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f} [{stat.se:.{digits}f}]"


def options_text(flags: Sequence[str]) -> str:
    """The read-out options of a run's flags (arch, lr and seed are columns of their own)."""
    options = [f"{flag.removeprefix('--')}={value}" for flag, value in zip(flags[::2], flags[1::2])
               if flag not in ("--arch", "--seed", "--lr")]
    return ", ".join(options) or "-"


TABLE_COLUMNS = ("read-out", "arch, options", "encoding", "read-out params", "head params", "total params", "lr",
                 "seeds", "20-NN top-1", "20-NN at init", "20-NN gain", "linear top-1", "linear at init",
                 "linear gain", f"20-NN @{PCA_DIM}", f"20-NN @{PCA_DIM} at init", f"linear @{PCA_DIM}",
                 f"linear @{PCA_DIM} at init", "img/s", "train min", "eval min")


def header(columns: Sequence[str]) -> str:
    return "| " + " | ".join(columns) + " |\n" + "| --- " * len(columns) + "|\n"


def count(value: int | None) -> str:
    return f"{value:,}" if value is not None else "-"


def results_table(summaries: Mapping[str, Mapping[str, Any]], pixels: Mapping[str, float] | None) -> str:
    rows = []
    for name, summary in summaries.items():
        stats = summary["stats"]
        rows.append(f"| {name} | {summary['arch']} ({options_text(summary['flags'])}) | {summary['encoding_dim']} | "
                    f"{count(summary['readout_params'])} | {count(summary['head_params'])} | "
                    f"{count(summary['total_params'])} | {summary['lr']:g} | "
                    f"{', '.join(map(str, summary['seeds']))} | "
                    + " | ".join(cell(stats.get(metric), 1 if metric.endswith("minutes") or metric == "images_per_s"
                                      else 2) for metric in METRICS) + " |\n")
    if pixels is not None:
        def pixel(key: str) -> str:
            return f"{pixels[key]:.2f}" if key in pixels else "not measured yet"
        rows.append(f"| raw pixels | 28 px, flattened | 784 | - | - | - | - | - | {pixel('knn_top1')} | - | - | "
                    f"{pixel('linear_top1')} | - | - | {pixel('pca_knn_top1')} | - | {pixel('pca_linear_top1')} | "
                    "- | - | - | - |\n")
    return header(TABLE_COLUMNS) + "".join(rows)


COMPARISON_COLUMNS = ("row", "vs", "metric", "seeds", "difference [95% CI]", "p (Welch)", "p (Holm)", "verdict")


def comparisons_table(tests: Sequence[Comparison], summaries: Mapping[str, Mapping[str, Any]]) -> str:
    labels = dict(TESTED)
    rows = []
    for test in tests:
        welch, seeds = test.test, f"{len(summaries[test.row]['seeds'])} / {len(summaries[test.reference]['seeds'])}"
        interval = f"{welch.difference:+.2f}" + (f" [{welch.low:+.2f}, {welch.high:+.2f}]" if welch.low is not None
                                                 else "")
        p = "-" if welch.p is None else f"{welch.p:.3f}"
        adjusted = "-" if test.adjusted_p is None else f"{test.adjusted_p:.3f}"
        verdict = readout_stats.verdict(welch, test.adjusted_p)
        if readout_stats.undecided(welch) and min(len(summaries[name]["seeds"]) for name in (test.row, test.reference)
                                                  ) < readout_stats.MORE_SEEDS:
            verdict += f" (undecided: p in {readout_stats.UNDECIDED}, fewer than {readout_stats.MORE_SEEDS} seeds)"
        rows.append(f"| {test.row} | {test.reference} | {labels[test.metric]} | {seeds} | {interval} | {p} | "
                    f"{adjusted} | {verdict} |\n")
    return header(COMPARISON_COLUMNS) + "".join(rows)


def markers(profile: str) -> tuple[str, str]:
    return f"<!-- readouts:{profile}:begin -->", f"<!-- readouts:{profile}:end -->"


RECORD_HEADING = "## Run record"
RECORD_COLUMNS = ("date", "profile", "variant", "seed", "flags", "train min", "eval min", "img/s",
                  "20-NN top-1 / at init", "linear top-1 / at init", f"20-NN @{PCA_DIM} / at init",
                  f"linear @{PCA_DIM} / at init", "linear hold-out", "teacher H", "machine")
RECORD_HEADER = header(RECORD_COLUMNS)


def ensure_document(doc: Path) -> None:
    """A bare docs/readouts.md (every profile's markers and the run record) where none exists, e.g. in tests."""
    if doc.exists():
        return
    doc.parent.mkdir(parents=True, exist_ok=True)
    sections = "".join(f"## {name} profile\n\n{begin}\nnot measured yet\n{end}\n\n"
                       for name in PROFILES for begin, end in [markers(name)])
    doc.write_text(f"# Read-outs side by side\n\n{sections}{RECORD_HEADING}\n\n{RECORD_HEADER}")


@contextlib.contextmanager
def locked(doc: Path) -> Iterator[None]:
    """Hold an exclusive lock on the page while it is read and rewritten: two drivers sharing it (disjoint
    --variants, docs/readouts.md) must not lose each other's run record rows. flock, not a POSIX record lock
    (lockf): closing any descriptor of the file, as read_text and write_text do, drops a process's record locks."""
    with doc.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def replace_section(doc: Path, profile: str, text: str) -> None:
    """Put `text` between the profile's markers, leaving the rest of the page (prose, run record) as it is."""
    begin, end = markers(profile)
    with locked(doc):
        page = doc.read_text()
        if page.count(begin) != 1 or page.count(end) != 1:
            raise ValueError(f"{doc} must hold the markers {begin} and {end} once each")
        head, rest = page.split(begin)
        _, tail = rest.split(end)
        doc.write_text(f"{head}{begin}\n{text.rstrip()}\n{end}{tail}")


def _pair(record: Mapping[str, Any], key: str) -> str:
    trained, initial = record.get(f"{key}_top1"), record.get(f"{key}_init_top1")
    return "-" if trained is None else f"{trained:.2f} / {initial:.2f}"


def record_row(record: Mapping[str, Any]) -> str:
    """A run as one row of the run record: enough to rebuild the tables (--from_record)."""
    holdout, entropy = record.get("linear_holdout_top1"), record.get("teacher_entropy")
    cells = (record["date"], record["profile"], record["variant"], str(record["seed"]),
             f"`{' '.join(record['flags'])}`", f"{record['train_seconds'] / 60:.1f}",
             f"{record['eval_seconds'] / 60:.1f}", f"{record['images_per_s']:.1f}", _pair(record, "knn"),
             _pair(record, "linear"), _pair(record, "pca_knn"), _pair(record, "pca_linear"),
             "-" if holdout is None else f"{holdout:.2f}", "-" if entropy is None else f"{entropy:.2f}",
             record["machine"])
    return "| " + " | ".join(cells) + " |\n"


def append_record(doc: Path, record: Mapping[str, Any]) -> None:
    """One row per finished run at the end of the page, as docs/demo_recipes.md keeps its search."""
    with locked(doc):
        page = doc.read_text()
        if RECORD_HEADER not in page:
            page += f"\n{RECORD_HEADING}\n\n{RECORD_HEADER}"
        doc.write_text((page if page.endswith("\n") else page + "\n") + record_row(record))


def records_from_page(page: str, profile: Profile) -> list[dict[str, Any]]:
    """The profile's runs rebuilt from the run record (the last row of a (variant, lr, seed) wins): the numbers as
    recorded, sizes from the flags. A run without --lr in its flags trained at the profile's lr."""
    found: dict[tuple[str, float, int], dict[str, Any]] = {}
    for line in page.split(RECORD_HEADER, 1)[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != len(RECORD_COLUMNS) or cells[1] != profile.name:
            continue
        row = dict(zip(RECORD_COLUMNS, cells))
        flags = row["flags"].strip("`").split()
        options = dict(zip(flags[::2], flags[1::2]))
        lr = float(options.get("--lr", profile_lr(profile)))
        record: dict[str, Any] = {
            "date": row["date"], "profile": profile.name, "variant": row["variant"], "seed": int(row["seed"]),
            "lr": lr, "flags": flags, "arch": options["--arch"], "machine": row["machine"],
            "train_seconds": float(row["train min"]) * 60, "eval_seconds": float(row["eval min"]) * 60,
            "images_per_s": float(row["img/s"])}
        for key, column in (("knn", "20-NN top-1 / at init"), ("linear", "linear top-1 / at init"),
                            ("pca_knn", f"20-NN @{PCA_DIM} / at init"), ("pca_linear", f"linear @{PCA_DIM} / at init")):
            if row[column] != "-":
                record[f"{key}_top1"], record[f"{key}_init_top1"] = map(float, row[column].split("/"))
        for key, column in (("linear_holdout_top1", "linear hold-out"), ("teacher_entropy", "teacher H")):
            if row[column] != "-":
                record[key] = float(row[column])
        # the run's flags as main_dino.py resolves them (config < profile < run), for the sizes
        config = vars(parse_flags(get_args_parser(), ["--config", str(CONFIG), *profile.train.flags, *flags]))
        record.update(network_sizes(config))
        found[(record["variant"], lr, record["seed"])] = record
    return list(found.values())


def plot(summaries: Mapping[str, Mapping[str, Any]], pixels: Mapping[str, float], path: Path, title: str) -> None:
    """Bars of trained 20-NN and linear top-1 per read-out at full width and at PCA_DIM (error bars: std over
    seeds), the random init as hatched bars over them, raw pixels' 20-NN and linear as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    bars = [bar for bar in (("knn", "20-NN", "tab:blue"), ("linear", "linear probe (fast)", "tab:orange"),
                            ("pca_knn", f"20-NN @{PCA_DIM} PCs", "lightsteelblue"),
                            ("pca_linear", f"linear @{PCA_DIM} PCs", "navajowhite"))
            if any(f"{bar[0]}_top1" in summaries[name]["stats"] for name in names)]  # what was measured
    width = 0.8 / len(bars)
    figure, axes = plt.subplots(figsize=(max(8.0, 0.45 * len(bars) * len(names) + 2), 5.6))
    lines = {key: pixels[key] for key in ("knn_top1", "linear_top1") if key in pixels}
    lowest, highest = min(lines.values(), default=100.0), max(lines.values(), default=0.0)
    for position, (metric, label, colour) in enumerate(bars):
        for suffix, style in (("_top1", dict(color=colour, label=f"{label}, trained")),
                              ("_init_top1", dict(fill=False, hatch="//", edgecolor="black", linewidth=0.6,
                                                  label="same network at random init" if position == 0 else None))):
            measured = [(index, summaries[name]["stats"][metric + suffix]) for index, name in enumerate(names)
                        if metric + suffix in summaries[name]["stats"]]
            axes.bar([index + (position - (len(bars) - 1) / 2) * width for index, _ in measured],
                     [stat.mean for _, stat in measured], width, yerr=[stat.std or 0.0 for _, stat in measured],
                     capsize=2, **style)
            lowest = min([lowest, *(stat.mean - (stat.std or 0.0) for _, stat in measured)])
            highest = max([highest, *(stat.mean + (stat.std or 0.0) for _, stat in measured)])
    for key, style, label in (("knn_top1", "--", "20-NN"), ("linear_top1", ":", "linear")):
        if key in lines:
            axes.axhline(lines[key], color="gray", linestyle=style, label=f"raw pixels, {label} ({lines[key]:.2f})")
    axes.set_xticks(range(len(names)), names, fontsize=8)
    axes.set_ylim(max(0.0, math.floor(lowest) - 5), min(100.0, math.ceil(highest) + 2))
    axes.set_ylabel("top-1 (%); error bars: std over seeds")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def chosen_lrs(records: Sequence[Mapping[str, Any]], profile: Profile) -> dict[str, float | None]:
    """variant -> its chosen lr (None: not swept; all its runs form its row)."""
    seeds = {record["variant"]: min(r["seed"] for r in records if r["variant"] == record["variant"])
             for record in records}
    swept = {name for name in seeds if len({r["lr"] for r in records if r["variant"] == name}) > 1}
    return {name: chosen_lr(records, name, seeds[name], profile_lr(profile)) if name in swept else None
            for name in seeds}


PROBE_LRS = ("linear_lr", "linear_init_lr", "pca_linear_lr", "pca_linear_init_lr")


def grid_edges(records: Sequence[Mapping[str, Any]]) -> str:
    """How many of the runs' probes chose the grid's smallest or largest lr: an optimum at an edge may lie outside
    the grid (empty when the records do not say)."""
    chosen = [record[key] for record in records for key in PROBE_LRS if key in record]
    if not chosen:
        return ""
    batch = eval_linear.build_parser().get_default("batch_size_per_gpu")
    low, high = (scaled_lr(edge(eval_linear.DEFAULT_LR_GRID), batch) for edge in (min, max))
    at_edge = sum(1 for lr in chosen if math.isclose(lr, low) or math.isclose(lr, high))
    return (f"The probes' lr grid ({min(eval_linear.DEFAULT_LR_GRID):g} to {max(eval_linear.DEFAULT_LR_GRID):g}) "
            f"chose an end value in {at_edge} of {len(chosen)} probes. ")


def report(records: Sequence[Mapping[str, Any]], profile: Profile, pixels: Mapping[str, float], docs_dir: Path,
           command: str) -> str:
    """Rewrite the profile's tables in docs/readouts.md and its figure from the finished runs; returns the text."""
    lrs = chosen_lrs(records, profile)
    rows = row_records(records, lrs)
    summaries = summarize_runs(rows)
    tests = comparisons(summaries)
    tested = sum(1 for test in tests if test.adjusted_p is not None)
    figure = docs_dir / f"readouts_fmnist_{profile.name}.png"
    seeds = len({record["seed"] for runs in rows.values() for record in runs})
    num_train = profile.train.num_train or 60000
    num_test = profile.train.num_test or 10000
    title = (f"vit_tiny read-outs, DINO on Fashion-MNIST, {profile.name} profile\n{num_train} train / {num_test} "
             f"test images, {profile.train.epochs} epoch(s), up to {seeds} seed(s)")
    plot(summaries, pixels, figure, title)
    minutes = sum(record["train_seconds"] + record["eval_seconds"] for record in records) / 60
    dates = sorted({record["date"] for record in records})
    machines = sorted({record["machine"] for record in records})
    swept = {name: lr for name, lr in lrs.items() if lr is not None}
    text = (f"Measured by `{command}` on {', '.join(machines)}, "
            f"{' to '.join([dates[0], dates[-1]] if len(dates) > 1 else dates)}; {len(records)} "
            f"run{'s' if len(records) != 1 else ''}, "
            f"{minutes:.0f} minutes of training and evaluation in all. {num_train} train / {num_test} test images, "
            f"{profile.train.epochs} epoch(s) of {profile.train.batch_size}, training crops of {profile.tokens} "
            f"tokens, linear probe {profile.linear_epochs} epochs. "
            + (f"lr swept on seed {min(r['seed'] for r in records)} and chosen per row on the probe's train "
               f"hold-out ({', '.join(f'{name} {lr:g}' for name, lr in swept.items())}). " if swept else
               f"No lr sweep: every row at the profile's lr {profile_lr(profile):g}. ")
            + grid_edges(records)
            + f"Cells: mean ± std [standard error] over the seeds; @{PCA_DIM}: the first {PCA_DIM} principal "
              "components, fitted on the train split.\n\n"
            + results_table(summaries, pixels)
            + (f"\nComparisons (Welch's t-test, Holm's correction across the {tested} with 2 seeds or more on both "
               f"sides; verdict at {readout_stats.ALPHA:g} after Holm):\n\n" + comparisons_table(tests, summaries)
               if tests else
               "\nNo comparisons yet: they need `cls` or `sparo` and another row.\n")
            + f"\n![read-outs, {profile.name} profile]({figure.name})\n")
    replace_section(docs_dir / DOC_NAME, profile.name, text)
    return text


# --------------------------------------------------------------------------------------------------------- driver
def run_all(profile: Profile, variants: Sequence[Variant], seeds: Sequence[int], output_dir: Path,
            docs_dir: Path = DOCS_DIR, data_path: str | None = None, num_workers: int = 1,
            sweep: Sequence[float] = DEFAULT_SWEEP, max_seeds: int = readout_stats.MORE_SEEDS
            ) -> list[dict[str, Any]]:
    """Every (variant, lr, seed) not finished in `output_dir`: the lr sweep at the first seed, the chosen lr at the
    others, then seeds up to `max_seeds` for the rows of undecided comparisons; then the tables and figure from all
    finished runs there (also those of earlier invocations). Returns this invocation's records."""
    output_dir.mkdir(parents=True, exist_ok=True)
    doc = docs_dir / DOC_NAME
    ensure_document(doc)
    data_path = demo.prepare_data(output_dir, profile.train, data_path)
    pixels = raw_pixels(output_dir, data_path, profile.linear_epochs)
    lrs = sweep_lrs(profile, sweep) if len(sweep) > 1 else [profile_lr(profile)]
    records: list[dict[str, Any]] = []

    def run(variant: Variant, seed: int, lr: float) -> None:
        path = run_path(output_dir, variant.name, lr, seed)
        if path.exists():
            print(f"[reproduce] {run_name(variant.name, lr, seed)}: finished before, read from {path}", flush=True)
            records.append(finished_run(path, variant, seed, lr))
            return
        print(f"[reproduce] {run_name(variant.name, lr, seed)}: training {variant.arch}", flush=True)
        record = run_one(variant, seed, lr, profile, data_path, output_dir, num_workers)
        write_json(record, path)
        append_record(doc, record)
        records.append(record)
        print(f"[reproduce] {run_name(variant.name, lr, seed)}: 20-NN {record['knn_top1']:.2f} (init "
              f"{record['knn_init_top1']:.2f}), linear {record['linear_top1']:.2f} (init "
              f"{record['linear_init_top1']:.2f}), {record['train_seconds'] / 60:.1f} + "
              f"{record['eval_seconds'] / 60:.1f} min", flush=True)

    def lr_of(variant: Variant) -> float:
        lr = chosen_lr(records, variant.name, seeds[0], profile_lr(profile)) if len(lrs) > 1 else lrs[0]
        assert lr is not None  # the sweep seed ran first
        return lr

    for seed in seeds:  # seed-major: a comparison cut short still has every variant at the first seeds
        for variant in variants:
            for lr in (lrs if seed == seeds[0] else [lr_of(variant)]):
                run(variant, seed, lr)
    by_name = {variant.name: variant for variant in variants}
    while max_seeds > len(seeds):
        summaries = summarize_runs(row_records(records, {v.name: lr_of(v) for v in variants}))
        needing = [name for name in rows_needing_seeds(comparisons(summaries), summaries, max_seeds)
                   if name in by_name]
        if not needing:
            break
        extra = [seed for seed in range(max(seeds) + 1, max(seeds) + 1 + max_seeds) if seed not in seeds]
        print(f"[reproduce] undecided comparisons: {', '.join(needing)} get seeds up to {max_seeds}", flush=True)
        for name in needing:
            have = len(summaries[name]["seeds"])
            for seed in extra[:max_seeds - have]:
                run(by_name[name], seed, lr_of(by_name[name]))
    finished = [json.loads(path.read_text()) for path in sorted(output_dir.glob("*_seed*.json"))]
    print(report(finished, profile, pixels, docs_dir, f"python -m experiments.reproduce --profile {profile.name}"),
          flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = cli_errors.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=tuple(PROFILES), required=True)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/reproduce"),
                        help="runs go to OUTPUT_DIR/<profile>/; finished ones there are skipped on a rerun")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="the first is the lr sweep's seed")
    parser.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=None,
                        help="the rows to train (default: the profile's; cpu16 leaves out sparo_matched, whose "
                             "parameter match the cpu profile tests)")
    parser.add_argument("--lr_sweep", type=float, nargs="+", default=list(DEFAULT_SWEEP),
                        help="multiples of the profile's lr trained at the first seed; one value: no sweep")
    parser.add_argument("--max_seeds", type=int, default=readout_stats.MORE_SEEDS,
                        help="rows of a comparison with p in (0.01, 0.2) run up to this many seeds (<= the number "
                             "of --seeds: off)")
    parser.add_argument("--from_record", action="store_true",
                        help=f"train nothing: rebuild the profile's tables and figure from the run record in "
                             f"{DOC_NAME} (and the raw pixels of OUTPUT_DIR/<profile>, computed if missing)")
    parser.add_argument("--data_path", default=None,
                        help=f"folder of the Fashion-MNIST IDX files (default: {datasets.FASHION_MNIST_DIR}, else a "
                             "torchvision download)")
    parser.add_argument("--docs_dir", type=Path, default=DOCS_DIR,
                        help=f"where {DOC_NAME} and the figure go")
    parser.add_argument("--num_workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)))
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    output_dir = args.output_dir.resolve() / profile.name
    if min(args.lr_sweep) <= 0:
        raise ValueError("--lr_sweep multiples must be > 0")
    if args.from_record:
        doc = args.docs_dir.resolve() / DOC_NAME
        records = records_from_page(doc.read_text(), profile)
        if not records:
            raise ValueError(f"the run record in {doc} holds no {profile.name} runs")
        data_path = demo.prepare_data(output_dir, profile.train, args.data_path)
        print(report(records, profile, raw_pixels(output_dir, data_path, profile.linear_epochs), doc.parent,
                     f"python -m experiments.reproduce --profile {profile.name}"), flush=True)
        return records
    variants = resolve_variants(list(dict.fromkeys(args.variants or profile.variants)))
    return run_all(profile, variants, list(dict.fromkeys(args.seeds)), output_dir, args.docs_dir.resolve(),
                   args.data_path, args.num_workers, args.lr_sweep, args.max_seeds)


if __name__ == "__main__":
    eval_flags.run_cli(main)
