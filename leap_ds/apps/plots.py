"""The run report: density, lambda and accuracy against step, and per-matrix density."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(history: list[dict], evals: list[dict], report: dict, path, metric: str = "accuracy") -> None:
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    steps = [h["step"] for h in history]
    ax = axes[0, 0]
    ax.plot(steps, [h["global_density"] for h in history], label="global density")
    ax.axhline(report["target_density"], color="gray", ls="--", label="target")
    ax.set(xlabel="optimizer step", ylabel="density (fraction kept)", title="Global density", ylim=(0, 1.05))
    ax.legend()
    ax = axes[0, 1]
    ax.plot(steps, [max(h["lambda"], 1e-3) for h in history], color="tab:orange")
    ax.set(xlabel="optimizer step", ylabel="lambda", yscale="log", title="Adaptive coefficient lambda")
    ax = axes[1, 0]
    if evals:
        ax.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", color="tab:green")
    ax.set(xlabel="optimizer step", ylabel=f"validation {metric}", title=f"Validation {metric}")
    ax = axes[1, 1]
    names, dens = [], []
    for g in report["groups"]:
        for m in g["modules"]:
            names.append(m.replace("bert.encoder.layer.", "L").replace("model.layers.", "L"))
            dens.append(g["density"])
    ax.barh(range(len(names)), dens, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=max(4, 9 - len(names) // 12))
    ax.invert_yaxis()
    ax.axvline(report["target_density"], color="gray", ls="--")
    ax.set(xlabel="final density", title="Final density of every pruned matrix", xlim=(0, 1))
    fig.suptitle(f"LEAP: target {report['target_density']:.3f}, achieved {report['global_density']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
