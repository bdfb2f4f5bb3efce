"""Suite-wide test settings."""

import torch


# The tests use tiny models: one thread is as fast as two, and immune to oversubscription on a shared machine.
torch.set_num_threads(1)
