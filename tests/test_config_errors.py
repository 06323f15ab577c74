"""Overrides Hydra's grammar refuses: one line naming the override, and the fix where there is a simple one."""

import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from gpt_lightning.training.config_errors import one_line


def parse_error(override: str) -> OverrideParseException:
    with pytest.raises(OverrideParseException) as e:
        OverridesParser.create().parse_overrides([override])
    return e.value


@pytest.mark.parametrize("key", ["ckpt_path", "init_from"])
def test_a_checkpoint_name_with_an_equals_sign_gets_the_quoting_that_works(key):
    """ModelCheckpoint writes best-step=N.ckpt; Hydra reads the second '=' as a syntax error."""
    message = one_line(parse_error(f"{key}=runs/a/checkpoints/best-step=3.ckpt"))
    assert message == (f"cannot parse the override '{key}=runs/a/checkpoints/best-step=3.ckpt': mismatched input "
                       f"'=' expecting <EOF>; a value with '=' in it must be quoted for Hydra: "
                       f"'{key}=\"runs/a/checkpoints/best-step=3.ckpt\"'")
    suggested = shlex.split(message.rsplit(": ", 1)[1])[0]  # as the shell passes it
    assert OverridesParser.create().parse_overrides([suggested])[0].value() == "runs/a/checkpoints/best-step=3.ckpt"


def test_other_syntax_errors_name_the_override_without_a_hint():
    assert one_line(parse_error("ckpt_path=a(b")) == "cannot parse the override 'ckpt_path=a(b': no viable " \
                                                     "alternative at input 'a(b'"
