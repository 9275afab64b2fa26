"""PyTorch counterparts of the project's networks and of the released CPSC-DFKD iteration.

Needs the `torch` extra (`pip install "cpsc-jax[torch]"`); nothing else in cpsc_jax imports it.

    from cpsc_jax.pytorch.models import get_model
    net = get_model("resnet18", num_classes=10)
    net.load_state_dict(torch.load("student.pt"), strict=True)   # from cpsc-export-student

`models`: every registered architecture with exactly the converter's state_dict keys, the
conditional generator and the feature adapter. `dfkd`: the released training iteration (spec
of docs/method.md, section 4), used as the benchmark baseline and as the parity reference.
"""
