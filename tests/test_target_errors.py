"""A target that matches nothing says why, in the words of the mistake that was made."""

import pytest

from lorafit.lora import find_targets


def test_a_bare_name_given_as_a_string_is_explained_as_a_regex(make_llama):
    with pytest.raises(ValueError) as info:
        find_targets(make_llama(), "q_proj")
    msg = str(info.value)
    assert "a string is a regex that must match the whole module name" in msg
    assert "lora.target_modules='[q_proj,k_proj]'" in msg  # a list that works on this model
    assert "quotes needed in a multirun" in msg


def test_a_list_entry_that_matches_nothing_lists_the_layers(make_llama):
    with pytest.raises(ValueError, match="Its Linear layers are: q_proj, k_proj") as info:
        find_targets(make_llama(), ["qproj"])
    assert "a string is a regex" not in str(info.value)
