"""One default precision: the API's load_model, resolve_model, the Annotator and the command
line pick the same one, so an embedding cache made by one is reused by the others."""

import inspect

from napari_sam.cli.parser import build_parser


def _subparser(name):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_every_entry_point_defaults_to_the_same_precision():
    from napari_sam.api import Annotator
    from napari_sam.core.models import load_model, resolve_model

    defaults = {
        "load_model": inspect.signature(load_model).parameters["dtype"].default,
        "resolve_model": inspect.signature(resolve_model).parameters["dtype"].default,
        "Annotator": inspect.signature(Annotator).parameters["dtype"].default,
    }
    for command in ("segment", "embed", "propagate"):  # train runs in float32 and has no --dtype
        defaults[command] = _subparser(command).get_default("dtype")
    assert set(defaults.values()) == {"auto"}, defaults


def test_a_model_loaded_by_the_api_has_the_cli_identity(tiny_checkpoint):
    from napari_sam.core.models import load_model, model_identity, resolve_model

    cli_dtype = _subparser("embed").get_default("dtype")
    api = load_model(tiny_checkpoint, device="cpu")
    cli = resolve_model(str(tiny_checkpoint), device="cpu", dtype=cli_dtype)
    assert model_identity(api) == model_identity(cli)  # the cache key's model part
    assert api.source.dtype == cli.source.dtype
