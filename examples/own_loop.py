"""AC/DC in a plain PyTorch training loop: the three sparsetrain lines are marked.

Trains an MLP on scikit-learn's bundled 8x8 digits (real data, no download) and prints the sparsity reached.
Run: python examples/own_loop.py
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import sparsetrain

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
epochs, batch_size = 40, 50
steps_per_epoch = len(x_train) // batch_size
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

# 1. Choose the method; phases default to the official AC/DC proportions of the run.
sparsifier = sparsetrain.create("acdc", model, sparsity=0.9, total_epochs=epochs, steps_per_epoch=steps_per_epoch)
# 2. Attach it: it keeps masked weights at exactly zero around every optimizer step.
sparsifier.attach(optimizer)

for _epoch in range(epochs):
    order = torch.randperm(len(x_train))
    for i in range(steps_per_epoch):
        batch = order[i * batch_size : (i + 1) * batch_size]
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

# 3. Save its state with your checkpoint, so a resumed run continues exactly.
checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sparsifier": sparsifier.state_dict()}

with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
report = sparsifier.sparsity()
print(f"phase: {sparsifier.phase}, steps: {sparsifier.count}")
print(f"test accuracy: {100 * accuracy:.2f}%")
print(f"final sparsity: {report.overall:.4f}")
for name, value in report.layers.items():
    print(f"  {name}: {value:.4f}")
