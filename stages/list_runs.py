"""List every kept training run, current and archived -> artifacts/runs/{runs.md, runs.json, val_curves.png}.

    make runs
    python stages/list_runs.py

One line per run: when it finished (or last saved, if unfinished), the settings it was
given on top of config/defaults.yaml, epochs, best and final validation loss and bits
per byte, the largest overfitting gap of any epoch, wall time, and its folder. The
current run is artifacts/checkpoints/; `make train` moves a run with other settings to
artifacts/checkpoints-archive/ and brings a finished one back when its settings are asked
for again. val_curves.png overlays the validation loss of every run, epoch by epoch.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from lib.runtime.config import resolve_config, stage_parser, stage_paths
from lib.runtime.stage import log, run_stage
from lib.runtime.files import atomic_path, write_json_atomic, write_text_atomic
from lib.training.run_summary import settings_text, summarize_run


def kept_runs(paths: dict) -> tuple[list[dict], list[Path]]:
    """The current run first, then the archived ones, newest first; and the folders whose history is unreadable."""
    folders = [paths["checkpoints"]] + sorted(paths["archive"].glob("*"), reverse=True)
    runs, skipped = [], []
    for folder in folders:
        summary = summarize_run(folder) if folder.is_dir() else None
        if summary is not None:
            summary["current"] = folder == paths["checkpoints"]
            runs.append(summary)
        elif (folder / "history.json").is_file():  # a damaged history hides no run without a word
            log(f"skipped {folder}: its history.json cannot be read (damaged or cut short); the folder is untouched")
            skipped.append(folder)
    return runs, skipped


def table(runs: list[dict]) -> str:
    lines = ["| run | when | settings besides the defaults (Make variables, or train.py flags) | epochs | best val | final val | final bpb | max gap | wall s | folder |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        epochs = (f"{r['epochs']}" if r["finished"] else
                  f"{r['epochs']}/{r['epochs_planned']} (interrupted: train with its settings to resume)")
        lines.append(f"| {i}{' (current)' if r['current'] else ''} | {r['when']} | {settings_text(r['settings'])} | {epochs} | "
                     f"{r['best_val_loss']:.3f} | {r['final_val_loss']:.3f} | {r['final_val_bpb']:.3f} | "
                     f"{r['max_gap']:+.3f} | {r['wall_s']:.0f} | {r['folder']} |")
    return "\n".join(lines) + "\n"


def draw_val_curves(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, r in enumerate(runs, 1):
        label = f"{i}{' (current)' if r['current'] else ''}: {settings_text(r['settings'])}"
        ax.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], marker="o", markersize=3, label=textwrap.fill(label, 70))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (nats/token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(cfg):
    paths = stage_paths(cfg)
    runs, skipped = kept_runs(paths)
    if not runs:
        if not skipped:
            log(f"no runs yet: neither {paths['checkpoints']} nor {paths['archive']} holds a training history; "
                f"train one with `make train`")
        return
    out = Path(cfg["artifacts_dir"]) / "runs"
    text = table(runs)
    print(text, end="")
    write_text_atomic(out / "runs.md", "# Training runs\n\n" + text + "\n![validation loss per run](val_curves.png)\n")
    write_json_atomic(out / "runs.json", runs)
    draw_val_curves(runs, out / "val_curves.png")
    log(f"{len(runs)} run(s); table {out / 'runs.md'}, curves {out / 'val_curves.png'}")


if __name__ == "__main__":
    config = resolve_config(stage_parser("runs", __doc__), "runs")
    run_stage(main, config, report_time=False)
