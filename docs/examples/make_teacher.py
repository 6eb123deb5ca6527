"""Write teacher.pt (a TorchScript digits classifier trained here) and digits.npz for the README walk-through.

Uses scikit-learn's bundled digits data set (8×8 images flattened to 64 features, 10 classes); no downloads.
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

data = load_digits()
x = (data.data / 16.0).astype(np.float32)
y = data.target.astype(np.int64)
order = np.random.default_rng(0).permutation(len(x))
x, y = x[order], y[order]
cut = int(0.8 * len(x))

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
xt, yt = torch.from_numpy(x[:cut]), torch.from_numpy(y[:cut])
for _ in range(40):
    for idx in torch.randperm(cut).split(64):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(xt[idx]), yt[idx]).backward()
        opt.step()
teacher.eval()
with torch.no_grad():
    acc = (teacher(torch.from_numpy(x[cut:])).argmax(1).numpy() == y[cut:]).mean()
torch.jit.save(torch.jit.script(teacher), "teacher.pt")
np.savez("digits.npz", x=x[:cut], y=y[:cut], x_val=x[cut:], y_val=y[cut:])
print(f"teacher.pt (held-out accuracy {acc:.3f}) and digits.npz written")
