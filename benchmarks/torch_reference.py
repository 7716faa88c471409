"""PyTorch copies of flatjax's networks, and the reference's lambda_max method, for benchmarks.

The reference computes lambda_max with double-backprop Hessian-vector products in float32, summed
over chunks of the dataset, fed to scipy's ARPACK (`eigsh(k=6, which="LM")`) run to convergence.
"""

import time

import numpy as np
import scipy.sparse.linalg as sla
import torch

VGG_POOL_AFTER = (0, 1, 3, 5, 7)  # conv layers of VGG11 (config A) followed by 2x2 max-pooling


def layer_arrays(tree):
  """flatjax MLP/VGG parameters (or a tangent like them) as numpy arrays in PyTorch's layout/order."""
  convs = sorted((k for k in tree if k.startswith("Conv")), key=lambda k: int(k.split("_")[1]))
  denses = sorted((k for k in tree if k.startswith("Dense")), key=lambda k: int(k.split("_")[1]))
  arrays = []
  for name in convs + denses:
    kernel = np.asarray(tree[name]["kernel"], np.float32)
    arrays += [kernel.transpose((3, 2, 0, 1) if kernel.ndim == 4 else (1, 0)).copy(),
               np.asarray(tree[name]["bias"], np.float32)]
  return arrays


def torch_network(params):
  """A PyTorch MLP or VGG11 (no BatchNorm) holding a copy of flatjax's parameters."""
  arrays = layer_arrays(params)
  layers = []
  for k in range(0, len(arrays), 2):
    weight = arrays[k]
    if weight.ndim == 4:
      layers += [torch.nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1), torch.nn.ReLU()]
      if k // 2 in VGG_POOL_AFTER:
        layers.append(torch.nn.MaxPool2d(2, 2))
    else:
      if not any(isinstance(l, torch.nn.Flatten) for l in layers):
        layers.append(torch.nn.Flatten())
      layers += [torch.nn.Linear(weight.shape[1], weight.shape[0]), torch.nn.ReLU()]
  net = torch.nn.Sequential(*layers[:-1])  # no ReLU after the last layer
  with torch.no_grad():
    for p, a in zip(net.parameters(), arrays):
      p.copy_(torch.from_numpy(np.array(a)))
  return net


def nchw(x):
  """NHWC numpy images as a contiguous NCHW torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def reference_hvp(net, x, y, chunk):
  """Matvec of the mean-loss Hessian over (x, y), double backprop summed over chunks."""
  params = list(net.parameters())
  shapes = [p.shape for p in params]
  sizes = [p.numel() for p in params]
  xt, yt = nchw(x), torch.from_numpy(np.asarray(y, np.int64))
  n = xt.shape[0]

  def matvec(v):
    vs = [torch.from_numpy(np.asarray(c, np.float32)).reshape(s)
          for c, s in zip(np.split(np.asarray(v).ravel(), np.cumsum(sizes)[:-1]), shapes)]
    total = [torch.zeros(s) for s in shapes]
    for start in range(0, n, chunk):
      xb, yb = xt[start:start + chunk], yt[start:start + chunk]
      loss = torch.nn.functional.cross_entropy(net(xb), yb) * xb.shape[0] / n
      grads = torch.autograd.grad(loss, params, create_graph=True)
      dot = sum((g * u).sum() for g, u in zip(grads, vs))
      for t, h in zip(total, torch.autograd.grad(dot, params)):
        t += h
    return torch.cat([t.reshape(-1) for t in total]).numpy()

  return matvec, sum(sizes)


def reference_lambda_max(net, x, y, chunk, k=6, tol=0.0):
  """The reference's lambda_max: ARPACK eigsh(k, "LM") on double-backprop HVPs.

  Returns (largest eigenvalue, number of HVPs, wall seconds).
  """
  matvec, n = reference_hvp(net, x, y, chunk)
  count = [0]

  def counted(v):
    count[0] += 1
    return matvec(v)

  start = time.perf_counter()
  op = sla.LinearOperator((n, n), matvec=counted, dtype=np.float32)
  values = sla.eigsh(op, k=k, which="LM", tol=tol, return_eigenvectors=False)
  return float(np.max(values)), count[0], time.perf_counter() - start
