"""Small steps of the walkthrough that need Python: save, load, compare.

python -m examples.story save-v1 model.pth     # train-time save with the old class
python -m examples.story load model.pth        # strict load into today's class
python -m examples.story same-outputs model.pth original.pth
python -m examples.story identical model.pth original.pth
"""

from __future__ import annotations

import sys

import torch

from examples.simple_model import SimpleModel, SimpleModelV1


def save_v1(path: str) -> None:
    torch.manual_seed(0)
    model = SimpleModelV1()
    torch.save(model.state_dict(), path)
    print(f"saved SimpleModelV1 (fc1 10->20, fc2 20->5) to {path}")


def load(path: str) -> None:
    model = SimpleModel()
    try:
        model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    except RuntimeError as exc:
        print("load_state_dict failed:", str(exc).splitlines()[0])
        for line in str(exc).splitlines()[1:]:
            print("   ", line.strip())
        sys.exit(1)
    print(f"SimpleModel loaded {path} with strict=True")


def load_v3(path: str) -> None:
    from examples.simple_model import SimpleModelV3

    SimpleModelV3().load_state_dict(torch.load(path, weights_only=True), strict=True)
    print(f"SimpleModelV3 loaded {path} with strict=True")


def versioned_load(path: str) -> None:
    """Plain PyTorch loading into a versioned class: migrations run on the fly."""
    import logging

    from examples.versioned_model import VersionedSimpleModel

    logging.basicConfig(level=logging.INFO, format="  [%(name)s] %(message)s")
    model = VersionedSimpleModel()
    result = model.load_state_dict(torch.load(path, weights_only=True))
    print(f"VersionedSimpleModel (at {model.__schema_revision__}) loaded {path}: {result}")


def same_outputs(new_path: str, old_path: str) -> None:
    old = SimpleModelV1()
    old.load_state_dict(torch.load(old_path, weights_only=True), strict=True)
    new = SimpleModel()
    new.load_state_dict(torch.load(new_path, weights_only=True), strict=True)
    x = torch.randn(1000, 10)
    diff = (new(x) - old(x)).abs().max().item()
    print(f"strict load OK; max |new(x) - old(x)| over 1000 inputs = {diff}")
    if diff != 0:
        sys.exit(1)


def identical(a_path: str, b_path: str) -> None:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    same = list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )
    print(f"{a_path} and {b_path}: keys {list(a)}; tensors bit-identical: {same}")
    if not same:
        sys.exit(1)


COMMANDS = {
    "save-v1": save_v1,
    "load": load,
    "load-v3": load_v3,
    "versioned-load": versioned_load,
    "same-outputs": same_outputs,
    "identical": identical,
}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
