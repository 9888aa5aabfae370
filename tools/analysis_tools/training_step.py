"""What the training-step benchmarks share (benchmark_backbone.py, benchmark_rtmdet.py): a
variant's SGD step with its peak memory, and a DK layer that starts as the rigid conv it
replaces. Only torch and dk_ops are imported, so that a GPU machine without torchvision or mmcv
can run the benchmarks that need neither."""
import torch
from torch import nn

import dk_ops


def deform_kernel_from_rigid(layer_class, rigid: nn.Conv2d) -> nn.Module:
    """A dk_ops layer (default scope: kernel + 1) whose zero-offset kernel is ``rigid``'s."""
    layer = layer_class(rigid.in_channels, rigid.out_channels, rigid.kernel_size,
                        stride=rigid.stride, padding=rigid.padding, dilation=rigid.dilation,
                        groups=rigid.groups, bias=False)  # the replaced convs have none: BN follows
    with torch.no_grad():
        layer.weight.copy_(dk_ops.rigid_to_scope(rigid.weight, layer.scope_size))
    return layer


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class Trainee:
    """One variant's model, SGD optimizer (mmdet's momentum and decay) and step function;
    ``loss_fn(model, inputs)`` gives the step's loss.

    ``step`` records the loss of every step and, on CUDA, the step's peak memory: the peak
    the allocator saw during the step, less what was allocated when it began (the other
    variants' models among it), plus this model's own parameters, buffers and optimizer state.
    """

    def __init__(self, model, loss_fn, inputs, device, amp_dtype, seed):
        self.model, self.loss_fn, self.inputs = model, loss_fn, inputs
        self.device, self.amp_dtype, self.seed = device, amp_dtype, seed
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                         lr=0.01, momentum=0.9, weight_decay=1e-4)
        # float16 needs loss scaling against underflowing gradients; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.losses, self.peak_bytes = [], []

    def resident_bytes(self):
        state = [t for s in self.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        return tensor_bytes([*self.model.parameters(), *self.model.buffers(), *state])

    def step(self):
        on_cuda = self.device.type == 'cuda'
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            start_bytes = torch.cuda.memory_allocated(self.device) - self.resident_bytes()
        torch.manual_seed(self.seed)  # a detector's box sampling: the same in every variant
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            loss = self.loss_fn(self.model, self.inputs)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        # Gradients freed here, not kept until the next step, so that they count in this step's
        # peak and not in the start of the other variants' steps.
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        if on_cuda:
            self.peak_bytes.append(torch.cuda.max_memory_allocated(self.device) - start_bytes)
