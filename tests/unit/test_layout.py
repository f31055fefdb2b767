"""layout: the names of every key under a checkpoint root, their parsers and validators."""

from __future__ import annotations

from typing import Any

import pytest

from asyncckpt.layout import (
    MAX_EPOCH,
    attempt_token,
    decision_key,
    epoch_dir,
    epoch_of_key,
    index_key,
    manifest_key,
    parse_epoch_dir,
    parse_receipt_key,
    receipt_key,
    shard_key,
    split_writer_id,
    validate_epoch,
    validate_node_name,
    validate_run_id,
    writer_of_key,
)

EPOCHS = [0, 1, 9, 10, 99, 100, 12345, 10**9, MAX_EPOCH]


# --------------------------------------------------------------------------- validators


@pytest.mark.parametrize("name", ["trainer_0", "ps-1", "a.b", "_x", "0", "A" * 200, "node.with.dots"])
def test_a_valid_node_name_is_returned_as_is(name: str) -> None:
    assert validate_node_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".hidden",
        "a/b",
        "..",
        "x..y",
        "A" * 201,
        "sp ace",
        "tab\t",
        "new\nline",
        "\nleading",
        "ümlaut",
        "a\\b",
        "ok\n",
    ],
)
def test_an_invalid_node_name_is_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="invalid node name"):
        validate_node_name(name)


@pytest.mark.parametrize("name", [7, None, b"trainer_0", ["trainer_0"]])
def test_a_node_name_that_is_not_a_str_is_type_error(name: Any) -> None:
    with pytest.raises(TypeError, match="node names must be str"):
        validate_node_name(name)


@pytest.mark.parametrize("epoch", [0, 1, 12, MAX_EPOCH])
def test_a_valid_epoch_is_returned_as_is(epoch: int) -> None:
    assert validate_epoch(epoch) == epoch


@pytest.mark.parametrize(
    ("epoch", "error"),
    [
        (-1, ValueError),
        (MAX_EPOCH + 1, ValueError),
        (True, TypeError),
        (1.0, TypeError),
        ("3", TypeError),
        (None, TypeError),
    ],
)
def test_an_epoch_out_of_range_or_not_an_int_is_refused(epoch: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="epoch must be"):
        validate_epoch(epoch)


@pytest.mark.parametrize("run_id", ["job", "a" * 64, "A_b-9", "0"])
def test_a_valid_run_id_is_returned_as_is(run_id: str) -> None:
    assert validate_run_id(run_id) == run_id


@pytest.mark.parametrize(
    "run_id",
    ["", "a" * 65, "has/slash", "a.b", "sp ace", 7, None, "job\n"],
)
def test_an_invalid_run_id_is_value_error(run_id: Any) -> None:
    with pytest.raises(ValueError, match="invalid run id"):
        validate_run_id(run_id)


# --------------------------------------------------------------------------- keys and their parsers


@pytest.mark.parametrize("epoch", EPOCHS)
def test_every_key_of_an_epoch_lies_in_its_directory_and_parses_back_to_it(epoch: int) -> None:
    directory = epoch_dir(epoch)
    assert directory.endswith("/")
    assert parse_epoch_dir(directory.split("/")[1]) == epoch
    for key in (
        manifest_key(epoch),
        shard_key(epoch, "run0.0a1b2c", "trainer_0"),
        shard_key(epoch, "run0", "trainer_0", "0a1b2c"),
        receipt_key(epoch, "run0", "0a1b2c", "trainer_0"),
        index_key(epoch, "run0.0a1b2c"),
        decision_key(epoch, "run0.0a1b2c"),
    ):
        assert key.startswith(directory), key
        assert epoch_of_key(key) == epoch, key


def test_a_receipt_key_parses_back_to_its_writer_token_and_node() -> None:
    key = receipt_key(7, "run0", "0a1b2c", "trainer.0")
    assert parse_receipt_key(key) == ("run0", "0a1b2c", "trainer.0")
    for not_a_receipt in (manifest_key(7), shard_key(7, "run0", "trainer.0", "0a1b2c"), "epochs/x.receipt.json"):
        assert parse_receipt_key(not_a_receipt) is None, not_a_receipt


@pytest.mark.parametrize("writer", ["run0.0a1b2c", "run0"])
def test_every_object_of_a_writer_names_its_writer(writer: str) -> None:
    """gc claims a writer by the name its objects carry: decision, index, shards, receipts."""
    keys = [decision_key(7, writer), index_key(7, writer), shard_key(7, writer, "n"), shard_key(7, writer, "n", "ff")]
    keys.append(receipt_key(7, writer, "ff", "n"))
    assert {writer_of_key(key) for key in keys} == {writer}
    for no_writer in (manifest_key(7), "epochs/000000000007/stray", "epochs/000000000007/a b/x", "other/w/x"):
        assert writer_of_key(no_writer) is None, no_writer


@pytest.mark.parametrize(
    "key",
    ["manifest.json", "epochs/12/x", "epochs/000000000012", "other/000000000012/x", "epochs/00000000001a/x"],
)
def test_a_key_outside_any_epochs_directory_has_no_epoch(key: str) -> None:
    assert epoch_of_key(key) is None


@pytest.mark.parametrize(
    "name",
    [
        "1",
        "00000000001",
        "0000000000012",
        "00000000001a",
        "-00000000001",
        "000000000001\n",
    ],
)
def test_a_name_that_is_not_twelve_digits_is_no_epoch_directory(name: str) -> None:
    assert parse_epoch_dir(name) is None


def test_zero_padded_epoch_directories_sort_in_epoch_order() -> None:
    shuffled = [12345, 0, MAX_EPOCH, 10, 9, 100, 1, 10**9, 99]
    assert sorted(epoch_dir(e) for e in shuffled) == [epoch_dir(e) for e in sorted(shuffled)]
    assert sorted(manifest_key(e) for e in shuffled) == [manifest_key(e) for e in sorted(shuffled)]


# --------------------------------------------------------------------------- writer ids


def test_a_writer_id_splits_into_its_run_id_and_attempt_token() -> None:
    assert split_writer_id("run0.0a1b2c") == ("run0", "0a1b2c")
    assert split_writer_id("run0") == ("run0", "")


def test_attempt_tokens_are_known_in_advance_and_differ_per_seed_epoch_and_attempt() -> None:
    seed, other_seed = b"s" * 16, b"t" * 16
    token = attempt_token(seed, 3, 0)
    assert token == attempt_token(seed, 3, 0)
    assert len({token, attempt_token(seed, 3, 1), attempt_token(seed, 4, 0), attempt_token(other_seed, 3, 0)}) == 4
    assert validate_run_id(token) == token  # a token is safe inside a key
