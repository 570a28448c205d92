"""Weighted k-NN evaluation of a DINO (+SPARO) backbone, with per-slot analysis of SPARO encodings.

    python -m torch.distributed.run --nproc_per_node=8 eval_knn.py --pretrained_weights out/checkpoint.pth \
        --data_path /imagenet

Features: the teacher's SPARO encoding (unnormalized; L2-normalized as a whole for the cosine search) or the
final-norm CLS of a baseline, from the official Resize 256 / CenterCrop 224 view, or --load_features (this
repository's dump or an official DINO one, whose features are already normalized). Scores: exp(sim / T) votes of the
k nearest train samples (T = 0.07), searched on the GPU unless --use_cuda false. Prints one line per k,
`20-NN classifier result: Top1: X, Top5: Y`, and writes knn_<checkpoint>.json to --output_dir (default: the
checkpoint's folder). --test_sets searches the same bank with shifted test sets, --n_per_class with few-shot banks
drawn from the train split; one table then ends the output (docs/evaluation.md, Robustness evaluation).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Sequence

import torch

from sparo_dino import distributed
from sparo_dino.cli import config, eval_flags
from sparo_dino.cli import errors as cli_errors
from sparo_dino.eval import extraction, feature_cache, fewshot, knn, results_table
from sparo_dino.eval.knn import weighted_knn  # noqa: F401  (public API: eval_knn.weighted_knn)
from sparo_dino.eval.shifted_sets import VAL_NAME, EvalSet, restrict
from sparo_dino.io import provenance
from sparo_dino.model import registry
from sparo_dino.run_config import args_to_dict


def build_parser() -> argparse.ArgumentParser:
    parser = eval_flags.evaluation_parser(__doc__)
    group = parser.add_argument_group("k-NN")
    group.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200], help="numbers of neighbours")
    group.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    group.add_argument("--knn_backend", type=str, default="auto", choices=knn.BACKENDS,
                       help="exact search: faiss when installed and able to search where asked (a GPU search needs "
                            "faiss-gpu), else torch; the results record what ran")
    group.add_argument("--bank_dtype", type=str, default="fp32", choices=list(knn.BANK_DTYPES),
                       help="torch backend: how the L2-normalized train bank is held; fp16 halves it (ImageNet x "
                            "SPARO: 10.5 GB instead of 21) with similarities within 2**-11 of fp32's; fp32 gives "
                            "the official number exactly")
    group.add_argument("--shard_bank", type=config.bool_flag, default=False,
                       help="each rank keeps its own shard of the train features and searches it, and the ranks "
                            "merge their top-k: no process holds the whole bank (ImageNet x SPARO: 21 GB), none "
                            "gathers it; not with --per_slot, --select_slots, --dump_features or --load_features, "
                            "which need the whole bank in one process")
    group.add_argument("--use_cuda", type=config.bool_flag, default=True,
                       help="official flag: search the feature bank on the GPU (false: on the CPU, when the bank "
                            "does not fit in GPU memory); on a machine without GPU the search runs on the CPU")
    group = parser.add_argument_group("SPARO slot analysis")
    group.add_argument("--per_slot", action="store_true", help="k-NN top-1 of each slot used alone")
    group.add_argument("--select_slots", type=int, default=None,
                       help="keep the N slots with the best k-NN top-1 on a held-out part of the train set")
    group.add_argument("--holdout_fraction", type=float, default=0.1,
                       help="share of the train set held out to rank slots (never the test set)")
    group.add_argument("--slot_knn", type=int, default=20, help="k of the per-slot analysis and slot ranking")
    group.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    group = parser.add_argument_group("baseline")
    group.add_argument("--init_baseline", action="store_true",
                       help="also evaluate the network the run started from (same config and seed, random init) on "
                            "the same images with the same k-NN, and report the difference (with --per_slot, per "
                            "slot too)")
    return parser


def kind_resolver(args: argparse.Namespace) -> Callable[[str], str]:
    """arch -> feature kind; checked before any forward pass so a slot analysis of a baseline fails at once."""
    def kind_for(arch: str) -> str:
        if (args.per_slot or args.select_slots is not None) and not registry.has_slots(arch):
            raise ValueError(f"--per_slot and --select_slots need a slot read-out "
                             f"({registry.arch_patterns('has_slots')}), not {arch}")
        return extraction.feature_kind(arch)
    return kind_for


def _accuracies(scores: dict[int, torch.Tensor], labels: torch.Tensor, present: torch.Tensor | None = None,
                bank_size: int | None = None) -> dict[str, dict[str, float]]:
    """Top-1/top-5 per k; with `present`, predicted among those classes only (a test set holding some classes).
    With `bank_size`, each entry also says the k the search used (`k`: at most the bank's size)."""
    results = {}
    for k, class_scores in scores.items():
        top1, top5 = knn.topk_accuracy(restrict(class_scores, present), labels)
        results[str(k)] = {"top1": top1, "top5": top5}
        if bank_size is not None:
            results[str(k)]["k"] = min(k, bank_size)
    return results


def _neighbours(k: str, accuracy: dict[str, float]) -> str:
    """`20-NN`, or `60-NN (asked 500)` where the train bank held fewer than the k asked for."""
    used = int(accuracy.get("k", k))
    return f"{k}-NN" if used == int(k) else f"{used}-NN (asked {k})"


def _top1(accuracies: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"20": {"top1": x, ...}} -> {"20-NN": x}: the table's columns."""
    return {f"{k}-NN": acc["top1"] for k, acc in accuracies.items()}


def search_device(use_cuda: bool, device: torch.device) -> torch.device:
    """Where the k-NN search runs: this process's device, or the CPU with --use_cuda false."""
    return device if use_cuda else torch.device("cpu")


def run_knn(data: feature_cache.FeatureSet, args: argparse.Namespace, device: torch.device | None = None
            ) -> dict[str, Any]:
    """All k-NN numbers of one evaluation as a JSON-ready dict (accuracies in percent); `backend`, `device` and
    `bank_dtype` are where the search really ran, which --use_cuda alone does not say (faiss-cpu)."""
    device = device or torch.device("cpu")
    plan = knn.plan_search(args.knn_backend, search_device(args.use_cuda, device), args.bank_dtype)
    backend, where, bank_dtype = plan.backend, plan.device, plan.bank_dtype
    train, val = data.train_features, data.val_features
    train_labels, val_labels = data.train_labels, data.val_labels
    num_classes = data.num_classes

    def scores(queries: torch.Tensor) -> dict[int, torch.Tensor]:
        if "train_shard" in data.meta:  # this rank's shard of the bank (--shard_bank); every rank gets the scores
            return knn.sharded_knn_scores(train, train_labels, queries, num_classes, args.nb_knn, args.temperature,
                                          backend, where, bank_dtype, collective_device=device)
        return knn.knn_scores(train, train_labels, queries, num_classes, args.nb_knn, args.temperature, backend,
                              where, bank_dtype)

    num_train = data.meta["train_shard"]["num_train"] if "train_shard" in data.meta else len(train_labels)
    results: dict[str, Any] = {"knn": _accuracies(scores(val), val_labels, bank_size=num_train),
                               "num_train": num_train,
                               "num_test": len(val_labels), "num_classes": num_classes,
                               "temperature": args.temperature, "backend": backend, "device": str(where),
                               "bank_dtype": bank_dtype, "meta": data.meta}
    if data.test_sets:  # the same bank searched by each test set's features
        results["test_sets"] = {name: {**test.describe(num_classes),
                                       "knn": _accuracies(scores(test.features), test.labels, test.present,
                                                          bank_size=num_train)}
                                for name, test in data.test_sets.items()}
    if args.n_per_class:
        results["fewshot"] = fewshot_knn(data, args, plan)
    if not args.per_slot and args.select_slots is None:
        return results
    num_slots = data.meta["options"].get("num_slots")
    if num_slots is None:  # only an official dump records no model
        raise ValueError("--per_slot/--select_slots on an official DINO dump need --num_slots (the dump does not "
                         "record the model)")
    if args.per_slot:
        results["per_slot"] = {"k": args.slot_knn, "top1": knn.per_slot_top1(
            train, train_labels, val, val_labels, num_slots, num_classes, args.slot_knn, args.temperature, backend,
            where, bank_dtype)}
    if args.select_slots is not None:
        slots, holdout_top1 = knn.select_slots(train, train_labels, num_slots, args.select_slots, num_classes,
                                               args.holdout_fraction, args.slot_knn, args.temperature, args.seed,
                                               backend, where, bank_dtype)
        kept = knn.knn_scores(knn.keep_slots(train, num_slots, slots), train_labels,
                              knn.keep_slots(val, num_slots, slots), num_classes, args.nb_knn, args.temperature,
                              backend, where, bank_dtype)
        results["selected_slots"] = {"slots": slots, "holdout_fraction": args.holdout_fraction,
                                     "seed": args.seed, "k": args.slot_knn, "holdout_top1": holdout_top1,
                                     "knn": _accuracies(kept, val_labels, bank_size=num_train)}
    return results


def fewshot_knn(data: feature_cache.FeatureSet, args: argparse.Namespace, plan: knn.SearchPlan) -> dict[str, Any]:
    """k-NN with a bank of n training images per class (--n_per_class), --fewshot_tries seeded draws each, scored on
    val and every test set; k is clipped to the bank's size. Draws index the features extracted once."""
    sets = {VAL_NAME: EvalSet(data.val_features, data.val_labels, None), **data.test_sets}

    def evaluate(n: int, attempt: int, indices: torch.Tensor) -> fewshot.TryResult:
        bank, bank_labels = data.train_features[indices], data.train_labels[indices]
        return {name: _top1(_accuracies(knn.knn_scores(bank, bank_labels, test.features, data.num_classes, args.nb_knn,
                                                       args.temperature, plan.backend, plan.device, plan.bank_dtype),
                                        test.labels, test.present))
                for name, test in sets.items()}

    return {"tries": args.fewshot_tries, "seed": args.seed,
            "n_per_class": fewshot.run(data.train_labels, args.n_per_class, args.fewshot_tries, args.seed, evaluate,
                                       data.classes)}


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The closing table (eval/results_table.py): one k-NN top-1 column per k, at init beside it when asked."""
    tests = results.get("test_sets", {})
    sizes = {VAL_NAME: (results["num_test"], results["num_classes"]),
             **{name: (test["num_test"], test["num_classes"]) for name, test in tests.items()}}
    full = {VAL_NAME: _top1(results["knn"]), **{name: _top1(test["knn"]) for name, test in tests.items()}}
    init_full = None
    if "init_baseline" in results:
        init_full = {VAL_NAME: _top1(results["init_baseline"]),
                     **{name: _top1(test["knn"]) for name, test in results.get("init_test_sets", {}).items()}}
    return results_table.build_rows(sizes, full, results.get("fewshot", {}).get("n_per_class"), init_full,
                                 results.get("init_fewshot", {}).get("n_per_class"))


def _slot_spread(top1: list[float]) -> str:
    best = max(range(len(top1)), key=top1.__getitem__)
    return f"best {top1[best]:.2f} (slot {best}), mean {sum(top1) / len(top1):.2f}, worst {min(top1):.2f}"


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The official one-line-per-k summary, then the random-init baseline and the slot analysis."""
    lines = [f"{_neighbours(k, acc)} classifier result: Top1: {acc['top1']:.2f}, Top5: {acc['top5']:.2f}"
             for k, acc in results["knn"].items()]
    lines.append(f"k-NN search: {results['backend']} on {results['device']}, {results['bank_dtype']} bank")
    for k, acc in results.get("init_baseline", {}).items():
        gain = results["knn"][k]["top1"] - acc["top1"]
        lines.append(f"{_neighbours(k, acc)} classifier result at random init (same arch, seed and images): "
                     f"Top1: {acc['top1']:.2f}, Top5: {acc['top5']:.2f}; training "
                     f"{'adds' if gain > 0 else 'changes'} {gain:+.2f} points of Top1")
    if "per_slot" in results:
        k, top1 = results["per_slot"]["k"], results["per_slot"]["top1"]
        lines += [f"slot {slot} {k}-NN Top1: {acc:.2f}" for slot, acc in enumerate(top1)]
        lines.append(f"per-slot {k}-NN Top1: {_slot_spread(top1)}")
    if "init_per_slot" in results:
        k, top1 = results["init_per_slot"]["k"], results["init_per_slot"]["top1"]
        lines.append(f"per-slot {k}-NN Top1 at random init: {_slot_spread(top1)}")
    if "selected_slots" in results:
        selected = results["selected_slots"]
        lines.append(f"selected slots (best first on a {selected['holdout_fraction']:g} train hold-out): "
                     f"{selected['slots']}")
        lines += [f"{_neighbours(k, acc)} classifier result with {len(selected['slots'])} selected slots: "
                  f"Top1: {acc['top1']:.2f}, Top5: {acc['top5']:.2f}" for k, acc in selected["knn"].items()]
    if "table" in results:
        title = results_table.title("weighted k-NN", results.get("fewshot"))
        lines += results_table.format_rows(results["table"], title)
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = config.parse_args(build_parser(), argv)
    if min(args.nb_knn) < 1 or args.slot_knn < 1 or args.temperature <= 0:
        raise ValueError("--nb_knn and --slot_knn must be >= 1 and --temperature > 0")
    if args.select_slots is not None and args.select_slots < 1:
        raise ValueError(f"--select_slots must be >= 1, got {args.select_slots}")
    if args.init_baseline and args.load_features:
        raise ValueError("--init_baseline needs --pretrained_weights (a training checkpoint), not --load_features")
    if args.shard_bank and (args.per_slot or args.select_slots is not None or args.dump_features or args.load_features):
        raise ValueError("--shard_bank keeps the train features split over the ranks; --per_slot, --select_slots, "
                         "--dump_features and --load_features need them in one process")
    if args.shard_bank and args.n_per_class:
        raise ValueError("--n_per_class draws from the whole train bank in one process; not with --shard_bank")
    eval_flags.check_robustness_args(args)
    eval_flags.check_pca_args(args, {
        "--per_slot/--select_slots": "principal components mix the slots" if args.per_slot or
        args.select_slots is not None else "",
        "--shard_bank": "the components are fitted on the whole train split in one process" if args.shard_bank else ""})
    distributed.check_launcher_args(args)
    eval_flags.check_output_dirs(args)
    with distributed.process_group(args.dist_timeout_minutes, report_error=eval_flags.print_user_error) as info:
        # the baseline first: a checkpoint that cannot give it fails before the long extraction
        initial = (eval_flags.compute_features(args, info.device, kind_resolver(args), at_init=True,
                                             shard_train=args.shard_bank) if args.init_baseline else None)
        data = eval_flags.compute_features(args, info.device, kind_resolver(args), accept_official_dump=True,
                                         shard_train=args.shard_bank)
        if data is None:  # features live on the main process only (unless --shard_bank)
            return None
        results = run_knn(data, args, info.device)
        clipped = [k for k in args.nb_knn if k > results["num_train"]]
        if clipped and distributed.is_main_process():  # once, not again for the random-init baseline's search
            cli_errors.warn(f"--nb_knn {' '.join(map(str, clipped))} asks for more neighbours than the "
                            f"{results['num_train']} train features; the search uses all of them (reported as "
                            f"{results['num_train']}-NN (asked k))")
        if initial is not None:  # with --per_slot also per slot: what each slot holds before any training
            baseline = run_knn(initial, argparse.Namespace(**{**vars(args), "select_slots": None}), info.device)
            results["init_baseline"] = baseline["knn"]
            if "per_slot" in baseline:
                results["init_per_slot"] = baseline["per_slot"]
            results.update({f"init_{key}": baseline[key] for key in ("test_sets", "fewshot") if key in baseline})
        if not distributed.is_main_process():  # --shard_bank: every rank searched, the main process reports
            return None
        results["provenance"] = provenance.collect(args_to_dict(args), {"world_size": info.world_size})
        if args.test_sets or args.n_per_class:
            results["table"] = table_rows(results)
        for line in summary_lines(results):
            print(line, flush=True)
        output_dir = eval_flags.default_output_dir(args)
        eval_flags.write_results(results, os.path.join(output_dir, f"knn_{data.meta['tag']}.json"))
        return results


if __name__ == "__main__":
    eval_flags.run_cli(main)
