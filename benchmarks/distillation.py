"""Does label-free distillation recover the Dice that compression loses? The tiny synthetic pipeline, end to end.

Rows, per method (held-out labelled test cases that no model trained on; per-class and mean Dice by
``nnunet-compress compare``):

* base — the uncompressed tiny nnU-Net;
* no fine-tuning — Tucker (post-training) / one-shot Taylor pruning at the target FLOPs (Sauron has no such row:
  it prunes while it trains);
* + labels — nnU-Net's loss on the labelled training set;
* + label-free distillation — ``pseudo-dataset`` labels *extra unlabelled cases* with the base model and the
  student trains on them with ``--distill --alpha 1`` (the teacher's probabilities only);
* + labels + distillation — the labelled training set with ``--distill --alpha A``.

Every fine-tuning row runs the same epochs and iterations, on fold ``all`` of its dataset, from the base weights.

One run is one draw (the cases, the base model, the pruning choices), and a difference of 0.01-0.02 Dice between
two rows is the size of the spread between draws, so ``--seeds`` repeats the whole benchmark per seed, each in
``WORKDIR/seed_<s>`` with the cases of that seed, and reports every row as mean ± std over the seeds and the
aims per seed. A workspace of ``benchmarks/stability.py`` (same layout, the demo's base model of that seed) can be
reused as it is: ``--workdir benchmarks/work/stability``.

    python -m benchmarks.distillation                      # the README's table (about an hour per seed on 2 cores)
    python -m benchmarks.distillation --methods taylor --seeds 0 1 2 --workdir benchmarks/work/stability
    python -m benchmarks.distillation --methods tucker --epochs 2 --iterations 10 --tag smoke

Writes ``benchmarks/results/distillation_<tag>.json`` / ``.md`` and a bar plot ``distillation_<tag>.png``; the
workspaces keep every model, so a re-run only trains what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import RESULTS, WORK
from nnunet_compress.demo import tiny

PSEUDO_ID, PSEUDO_NAME = 503, "SyntheticUnlabelled"  # not the end-to-end test's 502, should they share a workspace
METHODS = ("tucker", "taylor", "sauron")


def unlabelled_indices(n: int) -> range:
    """Case indices beyond the labelled dataset's 16: scans no model was trained or tested on."""
    return range(1000, 1000 + n)


MIN_GAIN = 0.01  # labelled fine-tuning must gain this much Dice before a "share recovered" is printed


def cli(*args) -> None:
    from nnunet_compress.cli.main import main
    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"nnunet-compress {' '.join(map(str, args))} failed (exit {code})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=WORK / "distillation",
                   help="one workspace per seed under it, WORKDIR/seed_<s>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="repeat the benchmark once per seed: cases, base training, pruning and fine-tuning (0)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--base-epochs", type=int, default=tiny.BASE_EPOCHS, help="epochs of the tiny base model")
    p.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs of every fine-tuning row (8)")
    p.add_argument("--iterations", type=int, default=20, help="iterations per fine-tuning epoch (20)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--unlabelled", type=int, default=12, help="extra unlabelled cases for the label-free rows (12)")
    p.add_argument("--alpha", type=float, default=0.5, help="α of the labels + distillation rows (0.5)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--tucker-ratio", type=float, default=0.25)
    p.add_argument("--taylor-flops", type=float, default=0.5)
    p.add_argument("--tag", default="default")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args, seed: int):
        self.args, self.seed = args, seed
        self.ws = tiny.default_workspace(args.workdir / f"seed_{seed}", dataset_id=501)
        self.pseudo = tiny.TinyWorkspace(self.ws.root, PSEUDO_ID, PSEUDO_NAME)
        os.environ.update(self.ws.env())  # our in-process commands read nnU-Net's folders from the environment
        self.schedule = ["--epochs", args.epochs, "--iterations-per-epoch", args.iterations, "--val-iterations", 2,
                         "--lr", args.lr, "--augmentation", "none", "--seed", seed, "--overwrite"]

    # ---- data and base model ----------------------------------------------------------------------------
    def base(self) -> Path:
        tiny.prepare_dataset(self.ws, seed=self.seed, num_epochs=self.args.base_epochs)
        folder = self.ws.model_folder()
        if not tiny.checkpoint_path(folder).exists():
            print(f"[bench] training the tiny base model ({self.args.base_epochs} epochs)", flush=True)
            tiny.train(self.ws)
        return folder

    def unlabelled_images(self) -> Path:
        from nnunet_compress.nnunet.synthetic import write_unlabelled_images
        folder = self.ws.root / "unlabelled_images"
        if not folder.is_dir() or len(list(folder.iterdir())) != self.args.unlabelled:
            # indices beyond the labelled dataset's 16 cases: scans no model was trained or tested on
            write_unlabelled_images(folder, seed=self.seed, indices=unlabelled_indices(self.args.unlabelled))
        return folder

    def pseudo_dataset(self, base: Path) -> None:
        images = self.unlabelled_images()
        dataset_json = self.pseudo.raw_dataset / "dataset.json"
        plans = self.pseudo.plans_path(tiny.TINY_PLANS)
        if plans.is_file() and dataset_json.is_file() and \
                json.loads(dataset_json.read_text())["numTraining"] == self.args.unlabelled:
            # preprocessed into the folder the parent's plans name (their data identifier), not after the plans
            identifier = json.loads(plans.read_text())["configurations"][tiny.CONFIGURATION]["data_identifier"]
            if (plans.parent / identifier).is_dir():
                return
        print("[bench] pseudo-dataset: the base model labels the unlabelled cases; nnUNetv2_preprocess", flush=True)
        tiny.label_unlabelled_cases(self.ws, base, images, PSEUDO_ID, PSEUDO_NAME, seed=self.seed,
                                    indices=unlabelled_indices(self.args.unlabelled), tta=True)
        import shutil  # models trained on an earlier pseudo-dataset of this id are out of date
        shutil.rmtree(self.pseudo.results / self.pseudo.dataset_folder_name, ignore_errors=True)

    # ---- one fine-tuning row ----------------------------------------------------------------------------
    def finetune(self, method: str, trainer: str, variant: str, method_options: list, base: Path) -> Path:
        """variant: labels | label_free | labels_distill."""
        ws = self.pseudo if variant == "label_free" else self.ws
        a = self.args  # the settings are in the name: a re-run with other settings trains anew
        plans_name = (f"{tiny.TINY_PLANS}_bench_{method}_{variant}_e{a.epochs}i{a.iterations}lr{a.lr:g}"
                      f"a{a.alpha:g}T{a.temperature:g}")
        folder = ws.model_folder(trainer, plans_name)
        if tiny.checkpoint_path(folder, "all").exists():
            return folder
        distill = {"labels": [], "label_free": ["--distill", "--alpha", 1, "--temperature", self.args.temperature],
                   "labels_distill": ["--distill", "--alpha", self.args.alpha, "--temperature",
                                      self.args.temperature]}[variant]
        cli("plan", method, "-d", ws.dataset_id, "-c", tiny.CONFIGURATION, "-p", tiny.TINY_PLANS, *method_options,
            "--plans-name", plans_name, *self.schedule, *distill)
        t0 = time.time()
        print(f"[bench] {method} {variant}: nnUNetv2_train -tr {trainer} (dataset {ws.dataset_id}, fold all)",
              flush=True)
        tiny.train(ws, plans_name, trainer, fold="all", pretrained=tiny.checkpoint_path(base),
                   log_name=f"bench_{method}_{variant}")
        print(f"[bench]   trained in {time.time() - t0:.0f} s", flush=True)
        return folder

    def rows(self, method: str, base: Path) -> list[tuple[str, Path]]:
        a = self.args
        out = self.ws.root / "compressed"
        if method == "tucker":
            options = ["--rank-ratio", a.tucker_ratio, "--min-rank", 4]
            trainer, untuned = "nnUNetTrainerTucker", out / f"tucker{a.tucker_ratio}"
            if not untuned.exists():
                cli("tucker", base, "-o", untuned, *options)
            first = [(f"Tucker {a.tucker_ratio}, no fine-tuning", untuned)]
        elif method == "taylor":
            options = ["--target-flops", a.taylor_flops, "--step", 0.1, "--accumulate-batches", 4]
            trainer, untuned = "nnUNetTrainerTaylorPruning", out / f"taylor_oneshot_F{a.taylor_flops}"
            if not untuned.exists():  # one-shot Taylor scored on the unlabelled images (no labels needed)
                cli("prune", base, "-o", untuned, "--method", "taylor", "-i", self.unlabelled_images(),
                    "--target-flops", a.taylor_flops, "--step", 0.05, "--seed", self.seed)
            first = [(f"Taylor F{a.taylor_flops}, one-shot, no fine-tuning", untuned)]
        else:
            # thresholds that bite in a short run (the demo's): the paper's τ start only bites after long training
            options = ["--tau-start", 0.2, "--tau-max", 0.4, "--kappa", 4, "--rho", 2]
            trainer, first = "nnUNetTrainerSauron", []
        names = {"labels": "+ labels", "label_free": "+ label-free distillation",
                 "labels_distill": f"+ labels + distillation (alpha {a.alpha})"}
        return first + [(names[v], self.finetune(method, trainer, v, options, base)) for v in names]

    # ---- evaluation ---------------------------------------------------------------------------------------
    def compare(self, method: str, base: Path, rows: list[tuple[str, Path]]) -> dict:
        report = self.ws.root / "reports" / method
        names = ["base"] + [f"r{i}" for i in range(1, len(rows) + 1)]
        cli("compare", base, *[p for _, p in rows], "-i", self.ws.raw_dataset / "imagesTs", "-l",
            self.ws.raw_dataset / "labelsTs", "-o", report, "--disable-tta", "--no-timing", "--num-processes", 1,
            "--names", *names)
        return json.loads((report / "summary.json").read_text())


def table(results: dict) -> str:
    """One line per model; for results over several seeds (:func:`over_seeds`) the mean ± std and the worst seed."""
    classes = results["classes"]
    seeds = results.get("seeds")
    middle = f"mean Dice over {len(seeds)} seeds, mean ± std | min" if seeds else "mean Dice | params"
    lines = ["| method | model | " + " | ".join(classes) + f" | {middle} | GFLOPs/patch |",
             "|" + "---|" * 2 + "---:|" * (len(classes) + 3)]
    for r in results["rows"]:
        cells = (f"**{r['mean_dice']:.3f} ± {r['std']:.3f}** | {r['min']:.3f}" if seeds else
                 f"**{r['mean_dice']:.3f}** | {r['params']:,}")
        lines.append(f"| {r['method']} | {r['model']} | " + " | ".join(f"{r['dice'][c]:.3f}" for c in classes) +
                     f" | {cells} | {r['flops'] / 1e9:.3f} |")
    return "\n".join(lines)


def recovery(results: dict) -> list[str]:
    """Share of the Dice that labelled fine-tuning recovers which label-free distillation recovers."""
    notes = []
    for method in results["methods"]:
        rows = {r["model"]: r["mean_dice"] for r in results["rows"] if r["method"] == method}
        labels = next(v for k, v in rows.items() if k == "+ labels")
        free = next(v for k, v in rows.items() if k == "+ label-free distillation")
        both = next(v for k, v in rows.items() if k.startswith("+ labels + distillation"))
        start = next((v for k, v in rows.items() if "no fine-tuning" in k), None)
        # a share of a gain under 0.01 Dice is noise divided by noise (a Taylor run once printed "2474%")
        if start is not None and labels - start >= MIN_GAIN:
            notes.append(f"{method}: label-free distillation recovers {(free - start) / (labels - start):.0%} of the "
                         f"Dice labelled fine-tuning recovers ({start:.3f} -> labels {labels:.3f}, label-free "
                         f"{free:.3f}); labels + distillation {both:.3f} vs labels {labels:.3f}")
        else:
            notes.append(f"{method}: labels {labels:.3f}, label-free {free:.3f}, labels + distillation {both:.3f}"
                         + ("" if start is None else f" (no fine-tuning {start:.3f})"))
    return notes


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    colours = {"tucker": "tab:blue", "taylor": "tab:orange", "sauron": "tab:green", "base": "tab:grey"}
    x = range(len(rows))
    ax.bar(x, [r["mean_dice"] for r in rows], color=[colours[r["method"]] for r in rows],
           yerr=[r.get("std", 0.0) for r in rows], capsize=3)  # the spread over seeds, where there are several
    ax.set_xticks(list(x), [f"{r['method']}\n{r['model']}" for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean foreground Dice (held-out cases)")
    ax.set_ylim(0, 1)
    ax.set_title("Recovering Dice after compression: labels vs label-free distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_seed(args, seed: int) -> dict:
    """The whole benchmark on one seed's workspace: its rows (method, model, Dice per class, cost) and notes."""
    bench = Bench(args, seed)
    base = bench.base()
    bench.pseudo_dataset(base)
    results = {"seed": seed, "methods": args.methods, "rows": []}
    for method in args.methods:
        rows = bench.rows(method, base)
        summary = bench.compare(method, base, rows)
        results["classes"] = [c["name"] for c in summary["classes"]]
        labels = {"base": "base", **{f"r{i}": name for i, (name, _) in enumerate(rows, 1)}}
        for m in summary["models"]:
            if m["name"] == "base" and any(r["method"] == "base" for r in results["rows"]):
                continue
            per_class = {r["class"]: r["dice"] for r in summary["per_class"] if r["model"] == m["name"]}
            results["rows"].append({"method": "base" if m["name"] == "base" else method, "model": labels[m["name"]],
                                    "model_folder": m["path"], "dice": per_class, "mean_dice": m["mean_dice"],
                                    "params": m["params"], "flops": m["flops"]})
    results["recovery"] = recovery(results)
    return results


def over_seeds(per_seed: list[dict]) -> dict:
    """Every row as mean ± std (and min) over the seeds, and the two aims per seed.

    The aims, per method and seed: label-free distillation recovers >= 90% of the Dice that labelled fine-tuning
    recovers from the no-fine-tuning model (only where labels gain >= MIN_GAIN, else the share is noise over noise),
    and labels + distillation minus labels alone (>= 0 is the aim; its mean ± std says whether a miss is a trend).
    """
    first = per_seed[0]
    rows = []
    for i, r in enumerate(first["rows"]):
        same = [run["rows"][i] for run in per_seed]
        if any((x["method"], x["model"]) != (r["method"], r["model"]) for x in same):
            raise ValueError(f"the seeds' runs do not hold the same rows (row {i}: {r['method']} {r['model']}); "
                             "run every seed with the same --methods")
        means = [x["mean_dice"] for x in same]
        # pruned rows end at other sizes in other seeds: their cost is the mean over the seeds too
        rows.append({"method": r["method"], "model": r["model"],
                     "params": round(statistics.fmean(x["params"] for x in same)),
                     "flops": statistics.fmean(x["flops"] for x in same),
                     "mean_dice": statistics.fmean(means), "std": statistics.pstdev(means), "min": min(means),
                     "per_seed": means,
                     "dice": {c: statistics.fmean(x["dice"][c] for x in same) for c in first["classes"]}})
    aims = {}
    for method in first["methods"]:
        shares, margins = [], []
        for run in per_seed:
            by_model = {r["model"]: r["mean_dice"] for r in run["rows"] if r["method"] == method}
            labels = by_model["+ labels"]
            free = by_model["+ label-free distillation"]
            both = next(v for k, v in by_model.items() if k.startswith("+ labels + distillation"))
            start = next((v for k, v in by_model.items() if "no fine-tuning" in k), None)
            shares.append(None if start is None or labels - start < MIN_GAIN else (free - start) / (labels - start))
            margins.append(both - labels)
        aims[method] = {"share_recovered_per_seed": shares, "labels_distill_minus_labels_per_seed": margins,
                        "labels_distill_minus_labels": {"mean": statistics.fmean(margins),
                                                        "std": statistics.pstdev(margins)}}
    return {"seeds": [run["seed"] for run in per_seed], "classes": first["classes"], "rows": rows, "aims": aims}


def seeds_notes(agg: dict) -> list[str]:
    notes = []
    for method, a in agg["aims"].items():
        shares = ", ".join("n/a" if v is None else f"{v:.0%}" for v in a["share_recovered_per_seed"])
        margins = ", ".join(f"{v:+.3f}" for v in a["labels_distill_minus_labels_per_seed"])
        m = a["labels_distill_minus_labels"]
        notes.append(f"{method}: label-free share of the labelled recovery per seed {shares} (aim >= 90%); "
                     f"labels + distillation minus labels per seed {margins}, mean {m['mean']:+.3f} ± {m['std']:.3f} "
                     "(aim >= 0)")
    return notes


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    per_seed = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"distillation_{args.tag}"
    for seed in args.seeds:
        print(f"[bench] seed {seed}: workspace {args.workdir / f'seed_{seed}'}", flush=True)
        per_seed.append(run_seed(args, seed))
        # rewritten after every seed, so a long run reports early
        results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "per_seed": per_seed, "over_seeds": over_seeds(per_seed), "minutes": (time.time() - t0) / 60}
        text = "\n\n".join(f"Seed {run['seed']}:\n\n" + table(run) + "\n\n" +
                             "\n".join(f"- {n}" for n in run["recovery"]) for run in per_seed)
        text += (f"\n\nOver seeds {results['over_seeds']['seeds']}:\n\n" + table(results["over_seeds"])
                 + "\n\n" + "\n".join(f"- {n}" for n in seeds_notes(results["over_seeds"])) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
        stem.with_suffix(".md").write_text(text)
        plot(per_seed[-1] if len(per_seed) == 1 else {"rows": results["over_seeds"]["rows"]}, stem.with_suffix(".png"))
        print(text, flush=True)
    print(f"[bench] {results['minutes']:.1f} min; wrote {stem}.json/.md/.png")
    return results


if __name__ == "__main__":
    main()
