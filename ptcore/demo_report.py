"""The ``ptcore demo`` report: ``report.md`` and two PNG plots, written from the run's numbers
(``metrics.json``); every figure in the text comes from those measurements."""
from __future__ import annotations

from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def plot_training(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft_flops = result["flops"]["sft"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    sft = result["sft_metrics"]
    ax_loss.plot([m["flops"] for m in sft], [m["loss"] for m in sft], color="tab:blue", lw=1, label="SFT loss")
    ax_loss.set_xlabel("training compute (FLOPs = 6 x params x tokens)")
    ax_loss.set_ylabel("SFT cross-entropy (nats/token)")
    ax_loss.set_yscale("log")
    grpo = [m for m in result["grpo_metrics"] if m["reward"] is not None]
    if grpo:
        ax_r = ax_loss.twinx()
        ax_r.plot([m["flops"] for m in grpo], [m["reward"] for m in grpo], color="tab:orange", lw=1,
                  label="GRPO mean reward (train)")
        ax_r.set_ylabel("GRPO mean reward on train prompts")
        ax_r.set_ylim(0, 1)
        ax_r.legend(loc="upper right")
    ax_loss.legend(loc="upper left")
    ax_loss.axvline(sft_flops, color="gray", ls=":")
    ax_loss.set_title("training: SFT loss, then GRPO reward")

    curve = result["curve"]
    sft_pts = [c for c in curve if c["phase"] in ("init", "sft")]
    grpo_pts = [c for c in curve if c["phase"] == "sft"][-1:] + [c for c in curve if c["phase"] == "grpo"]
    for pts, color, phase in ((sft_pts, "tab:blue", "SFT"), (grpo_pts, "tab:orange", "GRPO")):
        x = [c["flops"] for c in pts]
        ax_acc.plot(x, [100 * c["heldout_accuracy"] for c in pts], "o-", color=color, label=f"{phase}: greedy")
        ax_acc.plot(x, [100 * c["heldout_sampled_accuracy"] for c in pts], "s--", color=color,
                    label=f"{phase}: sampled (T={result['settings']['temperature']})")
    ax_acc.axvline(sft_flops, color="gray", ls=":")
    ax_acc.set_xlabel("training compute (FLOPs)")
    ax_acc.set_ylabel("held-out accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_title(f"held-out accuracy ({result['heldout_problems']['accuracy_curve']} problems)")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_test_time(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("sft", "tab:blue"), ("grpo", "tab:orange")):
        tt = result["test_time"][name]
        label = "SFT" if name == "sft" else "SFT+GRPO"
        ax.plot(tt["n"], [100 * x for x in tt["best_of_n"]], "o-", color=color, label=f"{label}: best-of-N (verifier)")
        ax.plot(tt["n"], [100 * x for x in tt["majority"]], "s--", color=color, label=f"{label}: majority vote")
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["test_time"]["grpo"]["n"], [str(n) for n in result["test_time"]["grpo"]["n"]])
    ax.set_xlabel("samples per problem N (test-time compute)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"test-time scaling ({result['heldout_problems']['test_time']} held-out problems, "
                 f"T={result['settings']['temperature']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, result: dict) -> Path:
    out = Path(out)
    plot_training(result, out / "training.png")
    plot_test_time(result, out / "test_time.png")
    acc, sacc, s, t = result["accuracy"], result["sampled_accuracy"], result["settings"], result["timings_s"]
    sft_pts = [c for c in result["curve"] if c["phase"] == "sft"]
    grpo_pts = [c for c in result["curve"] if c["phase"] == "grpo"]
    lines = [
        "# ptcore demo: post-training scaling on a tiny model",
        "",
        f"Task `{result['task']}` ({result['task_config']}); a {result['parameters']:,}-parameter Llama-architecture "
        f"model trained from scratch; seed {result['seed']}. Accuracy is measured on held-out problems, a split "
        "that no training example comes from. All numbers below are measured in this run "
        "(`metrics.json` holds them all).",
        "",
        "## Held-out accuracy through training",
        "",
        f"Greedy: the share of held-out problems whose greedy completion is right. Sampled: the mean "
        f"over {s['eval_samples']} samples per problem at temperature {s['temperature']} (what GRPO "
        "optimizes, and N = 1 of the test-time table). SFT runs at a constant learning rate until greedy "
        f"accuracy on {s['n_val']} validation problems (train split, not trained on) reaches "
        f"{_pct(s['sft_target'])}; it stopped after {result['sft_steps']} steps.",
        "",
        f"| stage | training compute (FLOPs) | greedy ({result['heldout_problems']['accuracy_curve']} problems) | sampled |",
        "|---|---|---|---|",
        f"| random init | 0 | {_pct(acc['init'])} | {_pct(sacc['init'])} |",
        f"| after SFT ({result['sft_steps']} steps) | {result['flops']['sft']:.3g} | {_pct(acc['sft'])} | {_pct(sacc['sft'])} |",
        f"| after GRPO ({s['grpo_steps']} more steps) | {result['flops']['sft'] + result['flops']['grpo']:.3g} | "
        f"{_pct(acc['grpo'])} | {_pct(sacc['grpo'])} |",
        "",
        "Curve (step: greedy / sampled): SFT " + ", ".join(
            f"{c['step']}: {_pct(c['heldout_accuracy'])} / {_pct(c['heldout_sampled_accuracy'])}" for c in sft_pts)
        + "; GRPO " + ", ".join(
            f"{c['step']}: {_pct(c['heldout_accuracy'])} / {_pct(c['heldout_sampled_accuracy'])}" for c in grpo_pts) + ".",
        "",
        "![loss and held-out accuracy against training compute](training.png)",
        "",
        "## Test-time scaling: N samples per held-out problem",
        "",
        f"Sampling at temperature {s['temperature']} with "
        + ("ptcore's engine (paged KV cache, the N samples fork from one encoded prompt)"
           if result["sampler"] == "engine" else f"Hugging Face `generate` ({result['sampler_note']})")
        + f"; {result['heldout_problems']['test_time']} held-out problems. Best-of-N keeps the sample the "
        "task's verifier accepts (an oracle: right when any of the N is right); majority vote takes the most "
        f"frequent answer. Each N averages over the {s['max_samples']}/N disjoint groups of the "
        f"{s['max_samples']} samples.",
        "",
        "| N | SFT best-of-N | SFT majority | SFT+GRPO best-of-N | SFT+GRPO majority |",
        "|---|---|---|---|---|",
    ]
    a, b = result["test_time"]["sft"], result["test_time"]["grpo"]
    for i, n in enumerate(b["n"]):
        lines.append(f"| {n} | {_pct(a['best_of_n'][i])} | {_pct(a['majority'][i])} | "
                     f"{_pct(b['best_of_n'][i])} | {_pct(b['majority'][i])} |")
    lines += [
        "",
        "![accuracy against test-time samples](test_time.png)",
        "",
        "## Time",
        "",
        f"SFT {t['sft_train_s']:.0f} s (+{t['sft_eval_s']:.0f} s evaluating checkpoints), "
        f"GRPO {t['grpo_train_s']:.0f} s (+{t['grpo_eval_s']:.0f} s), test-time sampling {t['test_time_s']:.0f} s; "
        f"total {t['total_s']:.0f} s.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
