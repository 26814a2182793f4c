"""Mixed precision with ADOPT: bfloat16 autocast, or float16 autocast with a GradScaler.

    python examples/amp.py            # float16 + GradScaler where autocast supports it
    python examples/amp.py bfloat16   # bfloat16, no scaler needed

Runs on CUDA when available, else on CPU (torch.amp.GradScaler("cpu") exists in torch >= 2.3).
"""

import sys

import torch

from adoptim import ADOPTW

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if sys.argv[1:] == ["bfloat16"] else torch.float16
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).to(
    device
)
torch.nn.init.zeros_(model[2].weight)  # a zero-initialised last layer is fine
opt = ADOPTW(model.parameters(), lr=3e-3)
# GradScaler is only needed for float16; enabled=False makes it a pass-through.
scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)

x, y = torch.randn(256, 16, device=device), torch.randn(256, 1, device=device)
for step in range(40):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)  # skips the step (state included) if gradients overflowed
    scaler.update()
    if step % 10 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}  scale {scaler.get_scale():.0f}")
assert torch.isfinite(loss), "NaN/inf loss"
print(f"final loss {loss.item():.4f} ({dtype}, {device})")
