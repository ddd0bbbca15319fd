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

    python benchmarks/distillation.py                      # the README's table (about an hour on 2 idle cores)
    python benchmarks/distillation.py --methods tucker --epochs 2 --iterations 10 --tag smoke

Writes ``benchmarks/results/distillation_<tag>.json`` / ``.md`` and a bar plot ``distillation_<tag>.png``; the
workspace (``--workdir``) keeps every model, so a re-run only trains what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nnunet_compress.demo import tiny  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
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
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "work_distillation")
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
    def __init__(self, args):
        self.args = args
        self.ws = tiny.default_workspace(args.workdir, dataset_id=501)
        self.pseudo = tiny.TinyWorkspace(self.ws.root, PSEUDO_ID, PSEUDO_NAME)
        os.environ.update(self.ws.env())  # our in-process commands read nnU-Net's folders from the environment
        self.schedule = ["--epochs", args.epochs, "--iterations-per-epoch", args.iterations, "--val-iterations", 2,
                         "--lr", args.lr, "--augmentation", "none", "--overwrite"]

    # ---- data and base model ----------------------------------------------------------------------------
    def base(self) -> Path:
        tiny.prepare_dataset(self.ws, num_epochs=self.args.base_epochs)
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
            write_unlabelled_images(folder, seed=0, indices=unlabelled_indices(self.args.unlabelled))
        return folder

    def pseudo_dataset(self, base: Path) -> None:
        images = self.unlabelled_images()
        dataset_json = self.pseudo.raw_dataset / "dataset.json"
        done = self.pseudo.preprocessed / self.pseudo.dataset_folder_name / f"{tiny.TINY_PLANS}_3d_fullres"
        if done.is_dir() and dataset_json.is_file() and \
                json.loads(dataset_json.read_text())["numTraining"] == self.args.unlabelled:
            return
        print("[bench] pseudo-dataset: the base model labels the unlabelled cases; nnUNetv2_preprocess", flush=True)
        tiny.label_unlabelled_cases(self.ws, base, images, PSEUDO_ID, PSEUDO_NAME, seed=0,
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
                    "--target-flops", a.taylor_flops, "--step", 0.05)
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
    classes = results["classes"]
    head = "| method | model | " + " | ".join(classes) + " | mean Dice | params | GFLOPs/patch |"
    lines = [head, "|" + "---|" * 2 + "---:|" * (len(classes) + 3)]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['model']} | " + " | ".join(f"{r['dice'][c]:.3f}" for c in classes) +
                     f" | **{r['mean_dice']:.3f}** | {r['params']:,} | {r['flops'] / 1e9:.3f} |")
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
    ax.bar(x, [r["mean_dice"] for r in rows], color=[colours[r["method"]] for r in rows])
    ax.set_xticks(list(x), [f"{r['method']}\n{r['model']}" for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean foreground Dice (held-out cases)")
    ax.set_ylim(0, 1)
    ax.set_title("Recovering Dice after compression: labels vs label-free distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    bench = Bench(args)
    base = bench.base()
    bench.pseudo_dataset(base)
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "methods": args.methods, "rows": []}
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
    results["minutes"] = (time.time() - t0) / 60
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"distillation_{args.tag}"
    text = table(results) + "\n\n" + "\n".join(f"- {n}" for n in results["recovery"]) + "\n"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(text)
    plot(results, stem.with_suffix(".png"))
    print(text)
    print(f"[bench] {results['minutes']:.1f} min; wrote {stem}.json/.md/.png")
    return results


if __name__ == "__main__":
    main()
