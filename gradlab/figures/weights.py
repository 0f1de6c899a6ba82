"""Where the weights went: distance and cosine to init per layer, one bar per checkpoint (seaborn)."""

from __future__ import annotations

from typing import Any

from gradlab.figures.labels import label_from_attrs


def plot_per_layer(da: Any, ax: Any) -> Any:
    """Bar plot of a (checkpoint, layer) variable such as ``dist_init_layer`` or ``cos_init_layer``."""
    import seaborn as sns

    df = da.to_dataframe(name="value").reset_index()[["checkpoint", "layer", "value"]]
    df["checkpoint"] = df["checkpoint"].astype(str)
    df["layer"] = df["layer"].astype(str)
    sns.barplot(data=df, x="layer", y="value", hue="checkpoint", ax=ax, palette="colorblind")
    ax.set_ylabel(label_from_attrs(da))
    ax.set_xlabel(label_from_attrs(da["layer"]))
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    # the legend above the panel, never over the bars
    n = df["checkpoint"].nunique()
    ax.legend(title="checkpoint", fontsize=7, title_fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=min(n, 4), frameon=False)
    return ax
