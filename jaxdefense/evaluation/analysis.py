"""Channel-activation analysis of a checkpoint (Bai et al., ICLR 2021, Figures 1-3).

`python main.py --mode=analyze --config=... --workdir=DIR`: at each analysed insertion
point (the defended ones; the CAS placement for an undefended model), the mean activation
magnitude per channel on natural and on PGD examples, its uniformity (normalised entropy of
the channel-magnitude distribution: 1 = all channels equally active), and for FSR the
fraction of activations its mask marks non-robust (m < 0.5) on natural vs adversarial
inputs, for CIFS the mean channel importance (its softmax mask) natural vs adversarial;
and the CAS paper's activation frequency exactly as its script measures it (the
site's input, before the mask; the images of one class, `analysis.class_index`; a channel
active when its spatial mean exceeds 1% of the sample's largest; natural vs PGD-20 on the
CAS loss). Numbers go to `DIR/analysis.json`; sorted bar plots to
`DIR/analysis_<site>.png` and `DIR/analysis_frequency_<site>.png` when matplotlib is
installed (`pip install -e ".[plot]"`).
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxdefense import attacks, data, defenses, parallel
from jaxdefense.evaluation import plotting, setup
from jaxdefense.workdir import paths
from jaxdefense.defenses import outputs


def analysed_sites(model) -> tuple[str, ...]:
  """The defended sites, or where CAS would sit for an undefended model."""
  if model.defense.name != "none":
    return tuple(sorted(model.active_sites()))
  return tuple(sorted(model.clone(defense=defenses.DefenseConfig(name="cas"))
                      .active_sites()))


def normalised_entropy(magnitudes: np.ndarray) -> float:
  """H(p) / log(C) with p the channel magnitudes normalised to sum 1 (1 = uniform)."""
  p = np.asarray(magnitudes, np.float64)
  p = p / max(p.sum(), 1e-12)
  nonzero = p[p > 0]
  return float(-(nonzero * np.log(nonzero)).sum() / np.log(len(p)))


def _statistics(model, variables, x, weight, sites):
  """Per-site channel sums of |activation| over (N, H, W), FSR mask counts and CIFS mask
  sums, each example weighted by `weight` (0 for padding)."""
  _, state = model.apply(variables, x, train=False, mutable=["features", "intermediates"])
  w = weight[:, None, None, None]
  out = {"sites": {}, "fsr": {}, "cifs": {}}
  for site in sites:
    f = state["features"][f"{site}/output"][0].astype(jnp.float32)
    out["sites"][site] = {"channel_sum": jnp.sum(jnp.abs(f) * w, axis=(0, 1, 2)),
                 "positions": jnp.sum(weight) * f.shape[1] * f.shape[2]}
  for path, mask in jax.tree_util.tree_leaves_with_path(state.get("intermediates", {})):
    modules = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and k.key != "mask"]
    defense = outputs.module_defense(modules[-1])
    if defense == "fsr":
      out["fsr"][jax.tree_util.keystr(path)] = {
          "non_robust": jnp.sum((mask < 0.5) * w),
          "total": jnp.sum(weight) * np.prod(mask.shape[1:])}
    elif defense == "cifs":  # Named by its module path, e.g. "block3_4/cifs_block3_4_preact".
      out["cifs"]["/".join(modules)] = {"importance_sum": jnp.sum(mask * weight[:, None], axis=0),
                   "count": jnp.sum(weight)}
  return out


def _cifs_masks(natural: dict, adversarial: dict) -> dict[str, Any]:
  """Per CIFS module: the mean channel importance natural vs adversarial, its uniformity
  and how many of the 10 most important channels the two share."""
  out = {}
  for name in natural["cifs"]:
    entry = {}
    for kind, stats in (("natural", natural), ("adversarial", adversarial)):
      sums = stats["cifs"][name]
      mean = np.asarray(sums["importance_sum"]) / max(float(sums["count"]), 1)
      entry[kind] = {"channel_importance": mean.tolist(), "uniformity": normalised_entropy(mean),
                     "max": float(mean.max())}
    top = [set(np.argsort(-np.asarray(entry[k]["channel_importance"]))[:10])
           for k in ("natural", "adversarial")]
    entry["top10_shared"] = len(top[0] & top[1])
    out[name] = entry
  return out


# The CAS paper's activation frequency (ActivationAnalysis/freq_dis_resnet18_reg.py): a
# channel of a sample is active when its spatial mean exceeds this fraction of the sample's
# largest channel mean.
ACTIVE_FRACTION = 0.01


def active_channels(features: jax.Array) -> jax.Array:
  """(N, C) booleans: channel c of sample n is active, mean_hw f[n, :, :, c] > 1% of
  max_c' mean_hw f[n, :, :, c'] (Bai et al.'s activation frequency)."""
  means = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
  return means > ACTIVE_FRACTION * jnp.max(means, axis=-1, keepdims=True)


def _summed_over_batches(step, variables, images: np.ndarray, labels: np.ndarray,
                         config: ml_collections.ConfigDict, mesh, *, seed: int) -> Any:
  """`step(variables, batch, key)`'s outputs summed over the evaluation batches."""
  totals = None
  for i, (x, y, mask) in enumerate(data.eval_batches(
      images, labels, config.eval.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())):
    batch = parallel.shard_batch(mesh, {"images": x, "labels": y, "mask": mask})
    out = jax.device_get(step(variables, batch, jax.random.fold_in(jax.random.key(seed), i)))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  return totals


def _frequency(model, variables, x, weight, sites):
  """Per site, how many (weighted) samples activate each channel of the site's input,
  i.e. before the defense's mask, as the CAS paper's hook on layer4[1]'s ReLU sees it."""
  _, state = model.apply(variables, x, train=False, mutable=["features"])
  return {site: jnp.sum(active_channels(state["features"][f"{site}/input"][0])
                        * weight[:, None], axis=0) for site in sites}


def activation_frequency(config: ml_collections.ConfigDict, model, variables,
                         images: np.ndarray, labels: np.ndarray, mesh) -> dict[str, Any]:
  """The CAS paper's Figure 2 for the images of class `config.analysis.class_index`: per
  analysed site, how many images activate each channel, natural vs PGD-20 (random start,
  step 0.003 at eps 0.031, scaled with `eval.eps`; on main CE + CAS beta x mean CAS-head CE
  for CAS models, as its script attacks)."""
  sites = analysed_sites(model)
  eps, steps = config.eval.eps, 20
  loss = attacks.losses.with_aux_heads(attacks.losses.cross_entropy, config.defense.beta)
  chosen = config.analysis.class_index

  @jax.jit
  def step(variables, batch, key):
    x = data.to_float(batch["images"])
    x_adv = attacks.pgd(attacks.deployed(model, variables), x, batch["labels"], key,
                        eps=eps, step_size=eps * 0.003 / 0.031, steps=steps,
                        random_start=True, loss=loss)
    weight = (batch["mask"] & (batch["labels"] == chosen)).astype(jnp.float32)
    return (_frequency(model, variables, x, weight, sites),
            _frequency(model, variables, x_adv, weight, sites), jnp.sum(weight))

  natural, adversarial, count = _summed_over_batches(step, variables, images, labels,
                                                    config, mesh, seed=config.eval.seed + 1)
  return {"class_index": chosen, "num_images": int(count), "attack": f"PGD-{steps}",
          "eps": eps, "active_fraction": ACTIVE_FRACTION,
          "sites": {site: {"natural": np.asarray(natural[site]).astype(int).tolist(),
                           "adversarial": np.asarray(adversarial[site]).astype(int).tolist()}
                    for site in sites}}


def analyse(config: ml_collections.ConfigDict, model, variables, images: np.ndarray,
            labels: np.ndarray, mesh) -> dict[str, Any]:
  """Natural vs PGD-20 (config.eval_pgd) channel statistics at the analysed sites."""
  sites = analysed_sites(model)
  pgd = config.eval_pgd

  @jax.jit
  def step(variables, batch, key):
    x = data.to_float(batch["images"])
    x_adv = attacks.pgd(attacks.deployed(model, variables), x, batch["labels"], key,
                        eps=pgd.eps, step_size=pgd.step_size, steps=pgd.steps,
                        random_start=pgd.random_start)
    weight = batch["mask"].astype(jnp.float32)
    return (_statistics(model, variables, x, weight, sites),
            _statistics(model, variables, x_adv, weight, sites), jnp.sum(weight))

  natural, adversarial, count = _summed_over_batches(step, variables, images, labels,
                                                    config, mesh, seed=config.eval.seed)
  report: dict[str, Any] = {"num_examples": int(count), "attack": f"PGD-{pgd.steps}",
                            "eps": pgd.eps, "sites": {}}
  for site in sites:
    entry = {}
    for kind, stats in (("natural", natural), ("adversarial", adversarial)):
      s = stats["sites"][site]
      magnitude = s["channel_sum"] / s["positions"]
      entry[kind] = {"mean_magnitude": float(magnitude.mean()),
                     "uniformity": normalised_entropy(magnitude),
                     "channel_magnitude": magnitude.tolist()}
    report["sites"][site] = entry
  fraction = lambda stats, name: float(stats["fsr"][name]["non_robust"]
                                       / stats["fsr"][name]["total"])
  fsr = {name: {"natural_non_robust_fraction": fraction(natural, name),
                "adversarial_non_robust_fraction": fraction(adversarial, name)}
         for name in natural["fsr"]}
  if fsr:
    report["fsr_masks"] = fsr
  cifs = _cifs_masks(natural, adversarial)
  if cifs:
    report["cifs_masks"] = cifs
  return report


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, which: str = "best") -> dict:
  """Restores the run in `workdir`, analyses it, writes analysis.json and the plots."""
  s = setup.load(config, workdir, which)
  report = analyse(config, s.model, s.variables, s.images, s.labels, s.mesh)
  report["activation_frequency"] = activation_frequency(config, s.model, s.variables, s.images,
                                                        s.labels, s.mesh)
  report.update(checkpoint=which, step=s.step, defense=config.defense.name, dtype=s.dtype)
  if jax.process_index() == 0:
    paths.write_text(s.workdir / "analysis.json", json.dumps(report, indent=2))
    for site, entry in report["sites"].items():
      print(f"{site}: mean |activation| natural {entry['natural']['mean_magnitude']:.4f} "
            f"adversarial {entry['adversarial']['mean_magnitude']:.4f}; uniformity natural "
            f"{entry['natural']['uniformity']:.4f} adversarial "
            f"{entry['adversarial']['uniformity']:.4f}", flush=True)
    for name, entry in report.get("fsr_masks", {}).items():
      print(f"FSR mask {name}: non-robust fraction natural "
            f"{entry['natural_non_robust_fraction']:.4f} adversarial "
            f"{entry['adversarial_non_robust_fraction']:.4f}", flush=True)
    for name, entry in report.get("cifs_masks", {}).items():
      print(f"CIFS mask {name}: largest mean channel importance natural "
            f"{entry['natural']['max']:.4f} adversarial {entry['adversarial']['max']:.4f}; "
            f"uniformity natural {entry['natural']['uniformity']:.4f} adversarial "
            f"{entry['adversarial']['uniformity']:.4f}; top-10 channels shared "
            f"{entry['top10_shared']}", flush=True)
    frequency = report["activation_frequency"]
    for site, entry in frequency["sites"].items():
      print(f"{site} (before the mask), class {frequency['class_index']}, "
            f"{frequency['num_images']} images: channels active in at least half of them, "
            f"natural {int(np.sum(np.asarray(entry['natural']) * 2 >= frequency['num_images']))}"
            f", adversarial "
            f"{int(np.sum(np.asarray(entry['adversarial']) * 2 >= frequency['num_images']))} of "
            f"{len(entry['natural'])}", flush=True)
    if plotting.available("plots"):
      for name, figure in plotting.analysis_figures(report).items():
        plotting.write_png(figure, s.workdir / name)
  return report
