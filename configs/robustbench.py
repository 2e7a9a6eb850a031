r"""RobustBench's CIFAR architectures, for PyTorch weights imported with jaxdefense.interop.convert,
evaluated with standard AutoAttack at eps 8/255 (RobustBench's L-inf protocol).

    python -m jaxdefense.interop.convert import --layout=dm_wrn --torch=model.pt \
        --config=configs/robustbench.py:dm_wrn28_10 --workdir=workdirs/rb_dm_wrn28_10
    python main.py --config=configs/robustbench.py:dm_wrn28_10 --mode=eval --checkpoint=last \
        --workdir=workdirs/rb_dm_wrn28_10 --config.eval.num_examples=1000

The argument is `ARCH[,DATASET]`, DATASET cifar10 (default) | cifar100:
  wrn28_10, wrn34_10, wrn34_20, wrn70_16   WideResNet (layout `wrn`; `trades_wrn` with
                                           TRADES' / MART's unused sub_block1)
  dm_wrn28_10, dm_wrn34_20, dm_wrn70_16    DMWideResNet, Swish, the data set's mean / std
                                           inside the model (layout `dm_wrn`)
  preact_resnet18                          PreActResNet18 (layout `preact_resnet18`)
  dm_preact_resnet18                       DMPreActResNet, Swish (layout `dm_preact_resnet18`)
RobustBench's first N CIFAR test points are jaxdefense's (`eval.num_examples`, canonical
order), so its per-model clean and AutoAttack accuracies are the numbers to expect. A file
holding `mu` / `sigma` normalisation buffers (e.g. Wong2020Fast) is refused by name:
drop the two keys and set `--config.model.kwargs.input_mean/input_std` to their values.
"""
import ml_collections

from jaxdefense import data
from jaxdefense.config import defaults, spec

WRN = {"wrn28_10": (28, 10), "wrn34_10": (34, 10), "wrn34_20": (34, 20), "wrn70_16": (70, 16)}
DM_WRN = {"dm_wrn28_10": (28, 10), "dm_wrn34_20": (34, 20), "dm_wrn70_16": (70, 16)}
ARCHS = (*WRN, *DM_WRN, "preact_resnet18", "dm_preact_resnet18")
DM = {"activation": "swish", "conv_padding": "asymmetric"}


def get_config(argument: str = "wrn28_10"):
  arch, dataset = spec.parse(argument or "wrn28_10", "configs/robustbench.py",
                             spec.Field("ARCH", ARCHS),
                             spec.Field("DATASET", data.MEAN_STD, "cifar10"))
  c = defaults.get()
  c.name = f"robustbench_{arch}_{dataset}"
  c.data.name = dataset
  mean, std = data.MEAN_STD[dataset]
  if arch in WRN or arch in DM_WRN:
    depth, width = {**WRN, **DM_WRN}[arch]
    c.model.arch = "wide_resnet"
    kwargs = {"depth": depth, "width": width}
  else:
    c.model.arch = "preact_resnet18"
    kwargs = {"shortcut_input": "raw"}
    if arch == "preact_resnet18":
      kwargs["final_bn"] = False
    else:
      kwargs["shortcut_kernel"] = 3
  if arch.startswith("dm_"):
    kwargs.update(DM, input_mean=mean, input_std=std)
  c.model.kwargs = ml_collections.ConfigDict(kwargs)
  c.eval.protocol = "autoattack"
  c.eval.eps = 8 / 255
  return c
