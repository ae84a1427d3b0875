"""The worked examples in the docstrings of the tree ops run and produce the outputs they show.

A docstring example that drifts from the code fails here; a public function of the module that
loses its example fails too, so the examples cannot silently disappear.
"""

from __future__ import annotations

import doctest
import inspect

import redrafter_trt.ops.tree as tree


def test_tree_docstring_examples_hold():
    result = doctest.testmod(
        tree,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
        report=True,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed"
    assert result.attempted >= 15, f"only {result.attempted} docstring examples ran"


def test_every_documented_tree_function_has_an_example():
    # The functions that carry worked examples; a new public function may add itself here.
    for name in ("mask_words", "pack_tree", "bool_to_packed_mask", "packed_mask_to_bool"):
        fn = getattr(tree, name)
        assert inspect.getmodule(fn) is tree
        examples = doctest.DocTestParser().get_examples(fn.__doc__ or "")
        assert examples, f"redrafter_trt.ops.tree.{name} has no docstring example"


def test_examples_reproduce_the_design_worked_example():
    # The figures of docs/design.md section 5 (packed tokens, unpacker, offsets) appear in
    # pack_tree's docstring as the outputs it checks.
    doc = tree.pack_tree.__doc__
    assert "[[91, 92, 93, 95, 94, 96, 97, 0, 0, 0, 0, 0]]" in doc
    assert "[[[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]]]" in doc
    assert "[[0, 1, 2, 3, 2, 3, 3, 0, 0, 0, 0, 0]]" in doc
