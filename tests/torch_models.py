"""Small PyTorch models with the structure and state_dict key names of the authors' and
RobustBench's (jaxdefense/torch_layouts.py names each source), written here from reading that
code, for the conversion tests. Widths and depths are parameters so that tests stay small.
Each `forward` returns (logits, list of auxiliary logits) in eval mode: CAS heads in
forward order, FSR's (robust, non-robust, recalibrated).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights and BatchNorm statistics, so a mix-up of any two tensors shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if t.dtype != torch.float32:
        continue
      if name.endswith("running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif name.endswith(("running_mean", "bias")) or t.ndim == 1:
        t.copy_(0.2 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("weight") else 0))
      else:
        fan_in = t[0].numel()
        t.copy_(torch.randn(t.shape, generator=g) * (1.5 / fan_in) ** 0.5)
  return model.eval()


def _convnet(c: int, hidden: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(c, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                       nn.Conv2d(hidden, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU(), nn.Conv2d(hidden, c, 3, 1, 1, bias=False))


class Separation(nn.Module):
  def __init__(self, c: int, hidden: int, tau: float = 0.1):
    super().__init__()
    self.sep_net = _convnet(c, hidden)
    self.tau = tau

  def forward(self, feat):
    p = torch.sigmoid(self.sep_net(feat))
    e = 1e-8
    g = -torch.log(-torch.log(torch.tensor(0.5) + e) + e)  # eval-mode Gumbel noise, U = 0.5
    a = (torch.log(p + e) + g) / (self.tau + e)
    b = (torch.log(1 - p + e) + g) / (self.tau + e)
    mask = torch.softmax(torch.stack([a, b]), dim=0)[0]
    return feat * mask, feat * (1 - mask), mask


class Recalibration(nn.Module):
  def __init__(self, c: int, hidden: int):
    super().__init__()
    self.rec_net = _convnet(c, hidden)

  def forward(self, nr_feat, mask):
    return nr_feat + self.rec_net(nr_feat) * (1 - mask)


def add_fsr(model: nn.Module, c: int, hidden: int, num_classes: int) -> None:
  model.separation = Separation(c, hidden)
  model.recalibration = Recalibration(c, hidden)
  model.aux = nn.Sequential(nn.Linear(c, num_classes))


def apply_fsr(model: nn.Module, out, aux: list):
  r, nr, mask = model.separation(out)
  rec = model.recalibration(nr, mask)
  pool = lambda v: v.mean(dim=(2, 3))
  aux += [model.aux(pool(r)), model.aux(pool(nr)), model.aux(pool(rec))]
  return r + rec


def cas(fc: nn.Linear, out, aux: list):
  """CAS in eval mode: the head's predicted class's weight row masks the channels."""
  logits = fc(out.mean(dim=(2, 3)))
  aux.append(logits)
  return out * fc.weight[logits.argmax(1)][:, :, None, None]


class NonlinearProbe(nn.Module):
  """CIFS's nlBlock: global average pool, Linear, Softplus(beta=5)."""

  def __init__(self, cin: int, hidden: int):
    super().__init__()
    self.fc = nn.Linear(cin, hidden)

  def forward(self, x):
    return F.softplus(self.fc(x.mean(dim=(2, 3))), beta=5)


class Pool(nn.Module):
  def forward(self, x):
    return x.mean(dim=(2, 3))


class CIFSProbe(nn.Module):
  """CIFS's module (resnet_CIFS.py `CIFS`) in eval mode: the relevance is the gradient of
  the probe's top-2 logits w.r.t. the detached feature map, summed over H and W."""

  def __init__(self, c: int, mode: str, num_classes: int = 10):
    super().__init__()
    first = Pool() if mode == "linear" else NonlinearProbe(c, 128)
    self.Probe = nn.Sequential(first, nn.Linear(c if mode == "linear" else 128, num_classes))

  def forward(self, feat, aux):
    with torch.enable_grad():
      leaf = feat.detach().clone().requires_grad_(True)
      logits = self.Probe(leaf)
      top2 = logits.topk(2, dim=1)[1]
      picked = logits.gather(1, top2).sum()
      relevance = torch.autograd.grad(picked, leaf)[0].sum(dim=(2, 3))
    aux.append(self.Probe(feat))
    return feat * torch.softmax(relevance, dim=1)[:, :, None, None]


class BasicBlock(nn.Module):
  def __init__(self, cin: int, planes: int, stride: int, cas_head: bool = False,
               cifs_probe: str | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                    nn.BatchNorm2d(planes))
    if cas_head:
      self.fc = nn.Linear(planes, 10)
    if cifs_probe:
      self.Probe = CIFSProbe(planes, cifs_probe)

  def forward(self, x, aux):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
    if hasattr(self, "Probe"):
      return self.Probe(out, aux)
    return cas(self.fc, out, aux) if hasattr(self, "fc") else out


class ResNet(nn.Module):
  """kuangliu's ResNet as TRADES / MART / RobustBench, FSR's ResNet18_FSR (defense="fsr"),
  CAS's (defense="cas": CASBlocks in layer4) and CIFS's ResNet18_L4 (defense="cifs": CIFS
  blocks in layer4, nonlinear then linear probe)."""

  def __init__(self, blocks=(2, 2, 2, 2), width=64, num_classes=10, defense="none", hidden=64,
               in_channels=3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    cin = width
    for s, n in enumerate(blocks):
      planes = width * 2**s
      layer = []
      for b in range(n):
        last = s == len(blocks) - 1
        layer.append(BasicBlock(
            cin, planes, 2 if s and not b else 1, cas_head=defense == "cas" and last,
            cifs_probe=(("linear" if b == n - 1 else "nonlinear")
                        if defense == "cifs" and last else None)))
        cin = planes
      setattr(self, f"layer{s + 1}", nn.ModuleList(layer))
    if defense == "fsr":
      add_fsr(self, cin, hidden, num_classes)
    self.linear = nn.Linear(cin, num_classes)
    self.num_layers = len(blocks)

  def forward(self, x):
    aux = []
    out = F.relu(self.bn1(self.conv1(x)))
    for s in range(self.num_layers):
      for block in getattr(self, f"layer{s + 1}"):
        out = block(out, aux)
    if hasattr(self, "separation"):
      out = apply_fsr(self, out, aux)
    return self.linear(out.mean(dim=(2, 3))), aux


def _pad(v, stride: int, asymmetric: bool):
  if not asymmetric:
    return v
  return F.pad(v, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))


class WideBlock(nn.Module):
  """Madry's / TRADES' WRN block; `cas_head`: CAS's BasicBlock_CAS (mask on the conv path)."""

  def __init__(self, cin, cout, stride, cas_head=False):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.equal = cin == cout
    if not self.equal:
      self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
    if cas_head:
      self.fc = nn.Linear(cin, 10)

  def forward(self, x, aux):
    a = F.relu(self.bn1(x))
    inp = cas(self.fc, a, aux) if hasattr(self, "fc") else a
    out = self.conv2(F.relu(self.bn2(self.conv1(inp))))
    return (x if self.equal else self.convShortcut(a)) + out


class Group(nn.Module):
  def __init__(self, n, cin, cout, stride, cas_last=False):
    super().__init__()
    self.layer = nn.ModuleList(
        [WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                   cas_head=cas_last and i == n - 1) for i in range(n)])

  def forward(self, x, aux):
    for block in self.layer:
      x = block(x, aux)
    return x


class WideResNet(nn.Module):
  """TRADES' / RobustBench's WideResNet; FSR's (defense="fsr") and CAS's (defense="cas")."""

  def __init__(self, depth=34, widen=10, num_classes=10, defense="none", hidden=64,
               sub_block1=False):
    super().__init__()
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = Group(n, ch[0], ch[1], 1)
    if sub_block1:
      self.sub_block1 = Group(n, ch[0], ch[1], 1)
    self.block2 = Group(n, ch[1], ch[2], 2)
    self.block3 = Group(n, ch[2], ch[3], 2, cas_last=defense == "cas")
    self.bn1 = nn.BatchNorm2d(ch[3])
    self.fc = nn.Linear(ch[3], num_classes)
    if defense == "cas":
      self.extra_fc = nn.Linear(ch[3], 10)
    if defense == "fsr":
      add_fsr(self, ch[3], hidden, num_classes)

  def forward(self, x):
    aux = []
    out = self.block3(self.block2(self.block1(self.conv1(x), aux), aux), aux)
    out = F.relu(self.bn1(out))
    if hasattr(self, "extra_fc"):
      out = cas(self.extra_fc, out, aux)
    if hasattr(self, "separation"):
      out = apply_fsr(self, out, aux)
    return self.fc(out.mean(dim=(2, 3))), aux


class DMBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.batchnorm_0 = nn.BatchNorm2d(cin, momentum=0.01)
    self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
    self.batchnorm_1 = nn.BatchNorm2d(cout, momentum=0.01)
    self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.has_shortcut = cin != cout
    if self.has_shortcut:
      self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
    self.stride = stride

  def forward(self, x):
    a = F.silu(self.batchnorm_0(x))
    out = self.conv_0(_pad(a, self.stride, True))
    out = self.conv_1(F.silu(self.batchnorm_1(out)))
    return (self.shortcut(a) if self.has_shortcut else x) + out


class DMGroup(nn.Module):
  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.block = nn.Sequential(*[DMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                 for i in range(n)])


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


class DMWideResNet(nn.Module):
  """RobustBench's DMWideResNet with Swish: mean / std are not in the state_dict."""

  def __init__(self, depth=28, width=10, num_classes=10):
    super().__init__()
    n = (depth - 4) // 6
    ch = [16, 16 * width, 32 * width, 64 * width]
    self.register_buffer("mean", torch.tensor(MEAN).view(3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(STD).view(3, 1, 1), persistent=False)
    self.init_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.layer = nn.Sequential(DMGroup(n, ch[0], ch[1], 1), DMGroup(n, ch[1], ch[2], 2),
                               DMGroup(n, ch[2], ch[3], 2))
    self.batchnorm = nn.BatchNorm2d(ch[3], momentum=0.01)
    self.logits = nn.Linear(ch[3], num_classes)

  def forward(self, x):
    out = self.init_conv((x - self.mean) / self.std)
    for group in self.layer:
      out = group.block(out)
    out = F.silu(self.batchnorm(out))
    return self.logits(out.mean(dim=(2, 3))), []


class PreActBlock(nn.Module):
  """RobustBench's PreActBlock (raw-input shortcut) or AWP's (activated); keys alike."""

  def __init__(self, cin, planes, stride, activated_shortcut):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    if stride != 1 or cin != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))
    self.activated_shortcut = activated_shortcut

  def forward(self, x):
    a = F.relu(self.bn1(x))
    sc = self.shortcut(a if self.activated_shortcut else x) if hasattr(self, "shortcut") else x
    return self.conv2(F.relu(self.bn2(self.conv1(a)))) + sc


class PreActResNet(nn.Module):
  """RobustBench's PreActResNet18 (variant="robustbench") or AWP's (variant="awp": shortcut
  on the activated input, final `bn`)."""

  def __init__(self, width=64, num_classes=10, variant="robustbench"):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    cin = width
    for s in range(4):
      planes = width * 2**s
      blocks = [PreActBlock(cin, planes, 2 if s else 1, variant == "awp"),
                PreActBlock(planes, planes, 1, variant == "awp")]
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
      cin = planes
    if variant == "awp":
      self.bn = nn.BatchNorm2d(cin)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    out = self.conv1(x)
    for s in range(4):
      out = getattr(self, f"layer{s + 1}")(out)
    if hasattr(self, "bn"):
      out = F.relu(self.bn(out))
    return self.linear(out.mean(dim=(2, 3))), []


class DMPreActBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.batchnorm_0 = nn.BatchNorm2d(cin, momentum=0.01)
    self.conv_2d_1 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
    self.batchnorm_1 = nn.BatchNorm2d(cout, momentum=0.01)
    self.conv_2d_2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    if stride != 1 or cin != cout:
      self.shortcut = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
    self.stride = stride

  def forward(self, x):
    a = F.silu(self.batchnorm_0(x))
    sc = self.shortcut(_pad(x, self.stride, True)) if hasattr(self, "shortcut") else x
    out = self.conv_2d_2(F.silu(self.batchnorm_1(self.conv_2d_1(_pad(a, self.stride, True)))))
    return out + sc


class DMPreActResNet(nn.Module):
  """RobustBench's DMPreActResNet (depth 18; the widths scale with `width` here)."""

  def __init__(self, width=64, num_classes=10):
    super().__init__()
    self.register_buffer("mean", torch.tensor(MEAN).view(3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(STD).view(3, 1, 1), persistent=False)
    self.conv_2d = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    cin = width
    for s in range(4):
      cout = width * 2**s
      setattr(self, f"layer_{s}", nn.Sequential(DMPreActBlock(cin, cout, 2 if s else 1),
                                                DMPreActBlock(cout, cout, 1)))
      cin = cout
    self.batchnorm = nn.BatchNorm2d(cin, momentum=0.01)
    self.logits = nn.Linear(cin, num_classes)

  def forward(self, x):
    out = self.conv_2d((x - self.mean) / self.std)
    for s in range(4):
      out = getattr(self, f"layer_{s}")(out)
    return self.logits(F.silu(self.batchnorm(out)).mean(dim=(2, 3))), []


def _conv_bn_relu(cin, cout):
  return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class VGGFSR(nn.Module):
  """The FSR code's vgg16_FSR: block0..4 Sequentials, FSR after block3, a 3-Linear head."""

  def __init__(self, stages, num_classes=10, hidden=64):
    super().__init__()
    cin = 3
    for s, widths in enumerate(stages):
      layers = []
      for w in widths:
        layers += _conv_bn_relu(cin, w)
        cin = w
      setattr(self, f"block{s}", nn.Sequential(*layers))
    add_fsr(self, stages[3][-1], hidden, num_classes)
    self.classifier = nn.Sequential(nn.Linear(cin, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                    nn.Linear(512, num_classes))

  def forward(self, x):
    aux = []
    for s in range(5):
      x = getattr(self, f"block{s}")(x)
      if s == 3:
        x = apply_fsr(self, x, aux)
      x = F.max_pool2d(x, 2)
    return self.classifier(x.mean(dim=(2, 3))), aux


class ConvFC(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 3, padding=1)
    self.bn = nn.BatchNorm2d(cout)
    self.fc = nn.Linear(cout, 10)

  def forward(self, x, aux):
    return cas(self.fc, F.relu(self.bn(self.conv(x))), aux)


class VGGCAS(nn.Module):
  """The CAS code's VGG16_REG: layer1-4 conv_layer blocks with max-pool, layer5 of
  Conv_FC_Blocks, a Linear-BN-ReLU classifier (layer6, layer7) and layer8."""

  def __init__(self, stages, num_classes=10):
    super().__init__()
    cin = 3
    for s, widths in enumerate(stages[:4]):
      blocks = []
      for w in widths:
        blocks.append(nn.Sequential(*_conv_bn_relu(cin, w)))
        cin = w
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks, nn.MaxPool2d(2, 2)))
    blocks = []
    for w in stages[4]:
      blocks.append(ConvFC(cin, w))
      cin = w
    self.layer5 = nn.ModuleList(blocks)
    self.layer6 = nn.Sequential(nn.Linear(cin, 512), nn.BatchNorm1d(512), nn.ReLU())
    self.layer7 = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU())
    self.layer8 = nn.Linear(512, num_classes)

  def forward(self, x):
    aux = []
    for s in range(4):
      x = getattr(self, f"layer{s + 1}")(x)
    for block in self.layer5:
      x = block(x, aux)
    x = F.max_pool2d(x, 2).flatten(1)
    return self.layer8(self.layer7(self.layer6(x))), aux
