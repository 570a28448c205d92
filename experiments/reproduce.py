"""Read-outs side by side: the same ViT-Tiny trunk, recipe and budget with each read-out, several seeds, one table.

    python -m experiments.reproduce --profile cpu|gpu [--output_dir runs/reproduce] [--seeds 0 1 2] [--variants ...]

Whether SPARO helps is a claim about the read-out, so every other thing is held fixed: the trunk (vit_tiny), the
DINO recipe and budget of the demo's profile (experiments.demo), the images and both evaluations (weighted 20-NN and
the fast linear probe, each next to the same network at its random init). One seed says little on 4096 images, so
each read-out runs for several seeds and the table gives mean, std and standard error; a difference smaller than 2
standard errors of the difference counts as no difference. SPARO at L = V = D = 64 holds more parameters than the
transformer block it replaces, so `sparo_matched` gets the L whose read-out matches the block's size.

Each finished (variant, seed) is saved as JSON in the output folder and skipped on a rerun (an interrupted training
resumes from its checkpoint), so the script can be stopped and started again; every finished run also appends a
row to the run record in docs/readouts.md. The table (docs/readouts.md, between the profile's markers) and the figure
(docs/readouts_fmnist_<profile>.png) are rewritten from all finished runs at the end.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

import eval_linear
import sparo_vit
from experiments import demo
from sparo_dino.cli import errors as cli_errors
from sparo_dino.cli import eval_flags
from sparo_dino.data import datasets
from sparo_dino.eval import extraction
from sparo_dino.io import checkpoint as checkpoints
from sparo_dino.io import provenance
from sparo_dino.train.progress import LOG_NAME

TRUNK = "vit_tiny"
CONFIG = demo.CONFIGS[TRUNK]  # every variant starts from the baseline recipe; --arch and read-out flags on top
DOCS_DIR = demo.REPO_ROOT / "docs"
DOC_NAME = "readouts.md"
# The paper's DINO setting of SPARO beside L; written out so the table states what ran, whatever the defaults.
SPARO_SIZES = {"slot_dim": 64, "attn_dim": 64, "group_size": 1}


def as_flags(options: Mapping[str, int]) -> tuple[str, ...]:
    return tuple(part for key, value in options.items() for part in (f"--{key}", str(value)))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: a read-out of the vit_tiny trunk and the main_dino.py flags that set its options."""
    name: str
    arch: str
    flags: tuple[str, ...] = ()


VARIANTS = {
    "cls": Variant("cls", TRUNK),
    "gap": Variant("gap", f"{TRUNK}_gap"),
    "attpool": Variant("attpool", f"{TRUNK}_attpool"),
    "mhca": Variant("mhca", f"{TRUNK}_mhca", as_flags({"num_slots": 64, "slot_dim": 64})),
    "sparo": Variant("sparo", f"{TRUNK}_sparo", as_flags({"num_slots": 64, **SPARO_SIZES})),
}
MATCHED = "sparo_matched"  # SPARO with L chosen so that its read-out holds as many parameters as cls's last block
VARIANT_NAMES = (*VARIANTS, MATCHED)
REFERENCES = ("cls", "sparo")  # the verdict columns compare every row with these


@dataclasses.dataclass(frozen=True)
class Profile:
    """The demo's training profile plus the linear probe's epochs (the same for every row)."""
    name: str
    train: demo.Profile
    linear_epochs: int


PROFILES = {
    # The demo's CPU recipe (docs/demo_recipes.md) unchanged: 640 steps of 32 on 4096 images, k-NN and probe on
    # those and 2000 test images. One run with both evaluations takes 2.6-4 minutes on the 2 cores alone;
    # 6 read-outs x 3 seeds took 73 minutes on 2 cores (docs/readouts.md, "Time"): the budget needs no shrinking.
    "cpu": Profile("cpu", demo.PROFILES["cpu"], linear_epochs=30),
    # The demo's GPU profile: all 60k / 10k images, 10 epochs of 256 with 6 local crops, the config's recipe.
    "gpu": Profile("gpu", demo.PROFILES["gpu"], linear_epochs=100),
}


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
    for variant in variants:
        check_probe_reads_the_encoding(variant)
    return variants


# ------------------------------------------------------------------------------------------ one (variant, seed)
def linear_flags(variant: Variant) -> tuple[str, ...]:
    """eval_linear.py flags that make the probe read the encoding k-NN reads: the official baseline probe takes the
    CLS of the last 4 blocks, which would give cls three more blocks' features than any other read-out."""
    return ("--n_last_blocks", "1") if sparo_vit.readout_of(variant.arch) == "cls" else ()


def check_probe_reads_the_encoding(variant: Variant) -> None:
    """Both evaluations must see the same features of a row, or the two columns compare different things."""
    probe_args = eval_linear.build_parser().parse_args(["--fast", *linear_flags(variant)])
    probe_kind = eval_linear.kind_resolver(probe_args)(variant.arch)
    knn_kind = extraction.feature_kind(variant.arch)
    if probe_kind != knn_kind:
        raise ValueError(f"{variant.name}: the linear probe would read {probe_kind!r} features, k-NN reads "
                         f"{knn_kind!r}; reproduce.linear_flags must make them the same")


def run_path(output_dir: Path, variant: str, seed: int) -> Path:
    return output_dir / f"{variant}_seed{seed}.json"


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Written to a temporary name, then renamed: a kill never leaves a half file that a rerun would skip on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, path)


def finished_run(path: Path, variant: Variant, seed: int) -> dict[str, Any]:
    """A finished run's record, refused when it was trained with other flags than the variant has now (e.g. another
    matched L after a change to the read-out sizes): a row must not mix two settings."""
    record = json.loads(path.read_text())
    if record["flags"] != list(run_flags(variant, seed)):
        raise ValueError(f"{path} was trained with {' '.join(record['flags'])}, {variant.name} is now "
                         f"{' '.join(run_flags(variant, seed))}: remove it (or use another --output_dir) to run it "
                         "again")
    return record


def training_seconds(train_dir: Path) -> tuple[float, int]:
    """Seconds spent in training epochs and the number of epochs, from the run's log.txt (kept across resumes)."""
    records = [json.loads(line) for line in (train_dir / LOG_NAME).read_text().splitlines() if line.strip()]
    return sum(record["epoch_time_s"] for record in records), len(records)


def run_flags(variant: Variant, seed: int) -> tuple[str, ...]:
    """main_dino.py flags of one run on top of the config and the profile."""
    return ("--arch", variant.arch, *variant.flags, "--seed", str(seed))


def run_one(variant: Variant, seed: int, profile: Profile, data_path: str, output_dir: Path,
            num_workers: int) -> dict[str, Any]:
    """Train one (variant, seed), evaluate it with 20-NN and the fast linear probe (each with its random init) and
    return its record."""
    run_dir = output_dir / f"{variant.name}_seed{seed}"
    flags = run_flags(variant, seed)
    checkpoint = demo.train(run_dir / "train", profile.train, data_path, CONFIG, num_workers, flags)
    trained = time.time()
    knn = demo.evaluate_knn(checkpoint, data_path, run_dir, num_workers)
    linear = eval_linear.main(["--pretrained_weights", str(checkpoint), "--data_path", data_path, *demo.EVAL_FLAGS,
                               "--fast", "--init_baseline", "--epochs", str(profile.linear_epochs),
                               "--seed", str(seed), "--num_workers", str(num_workers),
                               "--output_dir", str(run_dir / "linear"), *linear_flags(variant)])
    evaluated = time.time()
    config = checkpoints.load_checkpoint(str(checkpoint))["config"]
    with torch.device("meta"):  # sizes only
        backbone = sparo_vit.build_backbone(**sparo_vit.backbone_kwargs(config))
    epoch_seconds, epochs = training_seconds(run_dir / "train")
    batch = profile.train.batch_size
    # the training loader drops the last incomplete batch of each epoch; k-NN's bank is the training split
    images = epochs * (knn["num_train"] // batch) * batch
    return {"variant": variant.name, "arch": variant.arch, "seed": seed, "profile": profile.name,
            "flags": list(flags), "linear_flags": list(linear_flags(variant)),
            "knn_top1": knn["knn"]["20"]["top1"], "knn_init_top1": knn["init_baseline"]["20"]["top1"],
            "linear_top1": linear["final"]["top1"], "linear_init_top1": linear["init_baseline"]["final"]["top1"],
            "feature_kind": linear["run"]["kind"], "encoding_dim": backbone.num_features,
            "total_params": sum(p.numel() for p in backbone.parameters()),
            "readout_params": backbone.readout_parameter_count(),
            "images_per_s": images / epoch_seconds, "train_seconds": epoch_seconds, "eval_seconds": evaluated - trained,
            "num_train": knn["num_train"], "num_test": knn["num_test"],
            "machine": provenance.machine(), "date": datetime.date.today().isoformat()}


def raw_pixels(output_dir: Path, data_path: str) -> float:
    """Raw-pixel weighted 20-NN on the profile's images, computed once per output folder."""
    path = output_dir / "raw_pixels.json"
    if path.exists():
        return json.loads(path.read_text())["knn_top1"]
    top1 = demo.raw_pixel_top1(data_path)
    write_json({"knn_top1": top1}, path)
    return top1


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


def compare(row: Stat, reference: Stat) -> tuple[float, float | None, str]:
    """row minus reference, the standard error of that difference (independent runs: SEs add in quadrature) and the
    verdict: a difference smaller than 2 standard errors is "no difference"."""
    difference = row.mean - reference.mean
    if row.se is None or reference.se is None:
        return difference, None, "n/a (1 seed)"
    se = math.hypot(row.se, reference.se)
    if abs(difference) < 2 * se or difference == 0:
        return difference, se, "no difference"
    return difference, se, "better" if difference > 0 else "worse"


METRICS = ("knn_top1", "knn_init_top1", "knn_gain", "linear_top1", "linear_init_top1", "linear_gain",
           "images_per_s", "train_minutes", "eval_minutes")


def metric_values(record: Mapping[str, Any]) -> dict[str, float]:
    """A run's numbers as the table shows them (gains over random init are per seed, then averaged)."""
    return {"knn_top1": record["knn_top1"], "knn_init_top1": record["knn_init_top1"],
            "knn_gain": record["knn_top1"] - record["knn_init_top1"],
            "linear_top1": record["linear_top1"], "linear_init_top1": record["linear_init_top1"],
            "linear_gain": record["linear_top1"] - record["linear_init_top1"],
            "images_per_s": record["images_per_s"], "train_minutes": record["train_seconds"] / 60,
            "eval_minutes": record["eval_seconds"] / 60}


def summarize_runs(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """variant -> its Stats per metric plus the facts every seed shares (arch, flags, sizes), in table order."""
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_variant.setdefault(record["variant"], []).append(record)
    summaries = {}
    for name in sorted(by_variant, key=lambda n: VARIANT_NAMES.index(n) if n in VARIANT_NAMES else len(VARIANT_NAMES)):
        runs = sorted(by_variant[name], key=lambda record: record["seed"])
        values = [metric_values(record) for record in runs]
        summaries[name] = {"stats": {metric: summarize([v[metric] for v in values]) for metric in METRICS},
                           "seeds": [record["seed"] for record in runs], **{key: runs[0][key] for key in (
                               "arch", "flags", "encoding_dim", "readout_params", "total_params")}}
    return summaries


# ------------------------------------------------------------------------------------------------------- output
def cell(stat: Stat, digits: int = 2) -> str:
    if stat.std is None:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f} [{stat.se:.{digits}f}]"


def verdict_cell(summary: Mapping[str, Any], reference: Mapping[str, Any] | None) -> str:
    if reference is None:
        return "not run"
    if reference is summary:
        return "-"
    parts = []
    for metric, label in (("knn_top1", "20-NN"), ("linear_top1", "linear")):
        difference, se, verdict = compare(summary["stats"][metric], reference["stats"][metric])
        spread = f" ± {se:.2f}" if se is not None else ""
        parts.append(f"{label} {difference:+.2f}{spread}: {verdict}")
    return "; ".join(parts)


def options_text(flags: Sequence[str]) -> str:
    """The read-out options of a run's flags (arch and seed are columns of their own)."""
    options = [f"{flag.removeprefix('--')}={value}" for flag, value in zip(flags[::2], flags[1::2])
               if flag not in ("--arch", "--seed")]
    return ", ".join(options) or "-"


TABLE_HEADER = ("| read-out | arch, options | encoding | read-out params | total params | seeds | 20-NN top-1 | "
                "20-NN at init | 20-NN gain | linear top-1 | linear at init | linear gain | img/s | train min | "
                "eval min | vs cls | vs sparo |\n" + "| --- " * 17 + "|\n")


def results_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name, summary in summaries.items():
        stats = summary["stats"]
        references = [summaries.get(reference) for reference in REFERENCES]
        rows.append(f"| {name} | {summary['arch']} ({options_text(summary['flags'])}) | {summary['encoding_dim']} | "
                    f"{summary['readout_params']:,} | {summary['total_params']:,} | "
                    f"{', '.join(map(str, summary['seeds']))} | "
                    + " | ".join(cell(stats[metric], 1 if metric.endswith("minutes") or metric == "images_per_s"
                                      else 2) for metric in METRICS)
                    + " | " + " | ".join(verdict_cell(summary, reference) for reference in references) + " |\n")
    return TABLE_HEADER + "".join(rows)


def markers(profile: str) -> tuple[str, str]:
    return f"<!-- readouts:{profile}:begin -->", f"<!-- readouts:{profile}:end -->"


RECORD_HEADING = "## Run record"
RECORD_HEADER = ("| date | profile | variant | seed | flags | train min | eval min | img/s | 20-NN top-1 / at init | "
                 "linear top-1 / at init | machine |\n" + "| --- " * 11 + "|\n")


def ensure_document(doc: Path) -> None:
    """A bare docs/readouts.md (both profiles' markers and the run record) where none exists, e.g. in tests."""
    if doc.exists():
        return
    doc.parent.mkdir(parents=True, exist_ok=True)
    sections = "".join(f"## {name} profile\n\n{begin}\nnot measured yet\n{end}\n\n"
                       for name in PROFILES for begin, end in [markers(name)])
    doc.write_text(f"# Read-outs side by side\n\n{sections}{RECORD_HEADING}\n\n{RECORD_HEADER}")


def replace_section(doc: Path, profile: str, text: str) -> None:
    """Put `text` between the profile's markers, leaving the rest of the page (prose, run record) as it is."""
    begin, end = markers(profile)
    page = doc.read_text()
    if page.count(begin) != 1 or page.count(end) != 1:
        raise ValueError(f"{doc} must hold the markers {begin} and {end} once each")
    head, rest = page.split(begin)
    _, tail = rest.split(end)
    doc.write_text(f"{head}{begin}\n{text.rstrip()}\n{end}{tail}")


def append_record(doc: Path, record: Mapping[str, Any]) -> None:
    """One row per finished run at the end of the page, as docs/demo_recipes.md keeps its search."""
    page = doc.read_text()
    if RECORD_HEADER not in page:
        page += f"\n{RECORD_HEADING}\n\n{RECORD_HEADER}"
    row = (f"| {record['date']} | {record['profile']} | {record['variant']} | {record['seed']} | "
           f"`{' '.join(record['flags'])}` | {record['train_seconds'] / 60:.1f} | {record['eval_seconds'] / 60:.1f} | "
           f"{record['images_per_s']:.1f} | {record['knn_top1']:.2f} / {record['knn_init_top1']:.2f} | "
           f"{record['linear_top1']:.2f} / {record['linear_init_top1']:.2f} | {record['machine']} |\n")
    doc.write_text(page if page.endswith("\n") else page + "\n")
    with doc.open("a") as handle:
        handle.write(row)


def plot(summaries: Mapping[str, Mapping[str, Any]], raw_pixel_top1: float, path: Path, title: str) -> None:
    """Bars of trained 20-NN and linear top-1 per read-out (error bars: std over seeds), the random init as hatched
    bars over them, raw pixels' 20-NN as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    width = 0.38
    figure, axes = plt.subplots(figsize=(max(7.0, 1.4 * len(names) + 2), 5.2))
    lowest = raw_pixel_top1
    for shift, metric, label, colour in ((-width / 2, "knn", "20-NN", "tab:blue"),
                                         (width / 2, "linear", "linear probe (fast)", "tab:orange")):
        x = [index + shift for index in range(len(names))]
        for suffix, style in (("_top1", dict(color=colour, label=f"{label}, trained")),
                              ("_init_top1", dict(fill=False, hatch="//", edgecolor="black", linewidth=0.6,
                                                  label=f"{label}, same network at random init"))):
            stats = [summaries[name]["stats"][metric + suffix] for name in names]
            axes.bar(x, [s.mean for s in stats], width, yerr=[s.std or 0.0 for s in stats], capsize=3, **style)
            lowest = min(lowest, *(s.mean - (s.std or 0.0) for s in stats))
    axes.axhline(raw_pixel_top1, color="gray", linestyle="--", label=f"raw pixels, 20-NN ({raw_pixel_top1:.2f})")
    axes.set_xticks(range(len(names)), names)
    axes.set_ylim(bottom=max(0.0, math.floor(lowest) - 5))
    axes.set_ylabel("top-1 (%); error bars: std over seeds")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(records: Sequence[Mapping[str, Any]], profile: Profile, raw_pixel_top1: float, docs_dir: Path) -> str:
    """Rewrite the profile's table in docs/readouts.md and its figure from the finished runs; returns the text."""
    summaries = summarize_runs(records)
    figure = docs_dir / f"readouts_fmnist_{profile.name}.png"
    first = records[0]
    seeds = len({record["seed"] for record in records})
    title = (f"vit_tiny read-outs, DINO on Fashion-MNIST, {profile.name} profile\n{first['num_train']} train / "
             f"{first['num_test']} test images, {profile.train.epochs} epoch(s), {seeds} seed(s)")
    plot(summaries, raw_pixel_top1, figure, title)
    minutes = sum(record["train_seconds"] + record["eval_seconds"] for record in records) / 60
    dates = sorted({record["date"] for record in records})
    machines = sorted({record["machine"] for record in records})
    text = (f"Measured by `python -m experiments.reproduce --profile {profile.name}` on {', '.join(machines)}, "
            f"{' to '.join([dates[0], dates[-1]] if len(dates) > 1 else dates)}; {len(records)} runs, "
            f"{minutes:.0f} minutes of training and evaluation in all. {first['num_train']} train / "
            f"{first['num_test']} test images, {profile.train.epochs} epoch(s) of {profile.train.batch_size}, linear "
            f"probe {profile.linear_epochs} epochs. Cells: mean ± std [standard error] over the seeds. Raw pixels: "
            f"{raw_pixel_top1:.2f} (20-NN).\n\n"
            + results_table(summaries)
            + f"\n![read-outs, {profile.name} profile]({figure.name})\n")
    replace_section(docs_dir / DOC_NAME, profile.name, text)
    return text


# --------------------------------------------------------------------------------------------------------- driver
def run_all(profile: Profile, variants: Sequence[Variant], seeds: Sequence[int], output_dir: Path,
            docs_dir: Path = DOCS_DIR, data_path: str | None = None, num_workers: int = 1) -> list[dict[str, Any]]:
    """Every (variant, seed) not finished in `output_dir`, then the table and figure from all finished runs there
    (also those of earlier invocations with other --variants or --seeds); returns this invocation's records."""
    output_dir.mkdir(parents=True, exist_ok=True)
    doc = docs_dir / DOC_NAME
    ensure_document(doc)
    data_path = demo.prepare_data(output_dir, profile.train, data_path)
    pixels = raw_pixels(output_dir, data_path)
    records = []
    for seed in seeds:  # seed-major: a comparison cut short still has every variant at the first seeds
        for variant in variants:
            path = run_path(output_dir, variant.name, seed)
            if path.exists():
                print(f"[reproduce] {variant.name} seed {seed}: finished before, read from {path}", flush=True)
                records.append(finished_run(path, variant, seed))
                continue
            print(f"[reproduce] {variant.name} seed {seed}: training {variant.arch}", flush=True)
            record = run_one(variant, seed, profile, data_path, output_dir, num_workers)
            write_json(record, path)
            append_record(doc, record)
            records.append(record)
            print(f"[reproduce] {variant.name} seed {seed}: 20-NN {record['knn_top1']:.2f} (init "
                  f"{record['knn_init_top1']:.2f}), linear {record['linear_top1']:.2f} (init "
                  f"{record['linear_init_top1']:.2f}), {record['train_seconds'] / 60:.1f} + "
                  f"{record['eval_seconds'] / 60:.1f} min", flush=True)
    finished = [json.loads(path.read_text()) for path in sorted(output_dir.glob("*_seed*.json"))]
    print(report(finished, profile, pixels, docs_dir), flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = cli_errors.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=tuple(PROFILES), required=True)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/reproduce"),
                        help="runs go to OUTPUT_DIR/<profile>/; finished ones there are skipped on a rerun")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=list(VARIANT_NAMES))
    parser.add_argument("--data_path", default=None,
                        help=f"folder of the Fashion-MNIST IDX files (default: {datasets.FASHION_MNIST_DIR}, else a "
                             "torchvision download)")
    parser.add_argument("--docs_dir", type=Path, default=DOCS_DIR,
                        help=f"where {DOC_NAME} and the figure go")
    parser.add_argument("--num_workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)))
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    variants = resolve_variants(list(dict.fromkeys(args.variants)))
    return run_all(profile, variants, list(dict.fromkeys(args.seeds)), args.output_dir.resolve() / profile.name,
                   args.docs_dir.resolve(), args.data_path, args.num_workers)


if __name__ == "__main__":
    eval_flags.run_cli(main)
