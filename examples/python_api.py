"""The Python API on a trained and swept workdir: the README's "Python API" example (tests/test_api.py runs it).

  python examples/python_api.py runs/fashion_mnist 10      # workdir, budget in millions of multiply-adds
"""
import sys

import numpy as np

import mutualnet_jax

workdir = sys.argv[1] if len(sys.argv) > 1 else 'runs/fashion_mnist'
budget_mflops = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0

run = mutualnet_jax.open(workdir)                    # reads workdir/config.json; the checkpoint waits until needed
row = run.best(budget_mflops=budget_mflops)          # the most accurate row of the query table within the budget
print(f'width {row.width:g} at {row.resolution} px: top-1 {row.top1:.2%}, {row.macs / 1e6:.2f} MFLOPs')

net = run.network(row.width, row.resolution)         # narrow weights + that configuration's BN statistics
images, labels = run.examples(8)                     # raw uint8 test images of the run's dataset, (8, 28, 28, 1)
logits = net(images)                                 # normalisation and resizing happen inside
top = net.top_k(images, k=3)                         # top.classes, top.probabilities: (8, 3) each
print('labels   ', labels)
print('predicted', top.classes[:, 0], 'with p =', np.round(top.probabilities[:, 0], 2))

path = run.export(row.width, row.resolution)         # workdir/export/w<width>_r<res>: a standalone network
exported = mutualnet_jax.load(path)
np.testing.assert_allclose(exported(images), logits, rtol=1e-5, atol=1e-5)
print('exported to', path)
