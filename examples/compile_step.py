"""Compile ADOPT's step with torch.compile, as for torch.optim optimizers.

    python examples/compile_step.py

The lr is a tensor so that a scheduler changing it does not recompile the step (a Python float
lr is a constant to the compiler: each new value would recompile, as with torch.optim.Adam).
"""

import torch

from adoptim import ADOPTW

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
opt = ADOPTW(model.parameters(), lr=torch.tensor(3e-3), weight_decay=1e-2)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)


# As for torch.optim: compile the step itself. It traces as one graph without breaks. Do not
# pass fullgraph=True here: a scheduler wraps opt.step in a function dynamo skips (the same
# happens with torch.optim.Adam); the step inside the wrapper is still compiled.
opt_step = torch.compile(opt.step)


x, y = torch.randn(256, 16), torch.randn(256, 1)
for step in range(50):
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt_step()
    sched.step()
    if step % 10 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}  lr {float(opt.param_groups[0]['lr']):.2e}")
print(f"final loss {torch.nn.functional.mse_loss(model(x), y).item():.4f}")
