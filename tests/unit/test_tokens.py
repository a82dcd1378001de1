"""Invite tokens off the command line: ``--join @FILE``, ``$MESHLLM_JOIN``, and what the state folder keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshllm.errors import MeshError
from meshllm.gossip.membership import JoinRefused
from meshllm.node.mesh import refusal_message
from meshllm.store.mesh import (JOIN_ENV, MESH_FILE, InviteToken, MeshCredentials, join_arguments,
                                load_or_create_mesh, save_mesh)
from meshllm.transport import Refusal

TOKEN = InviteToken(MeshCredentials.create(), ("127.0.0.2:7000",)).encode()
OTHER = InviteToken(MeshCredentials.create(), ("127.0.0.3:7000",)).encode()


def test_a_plain_join_value_is_the_token() -> None:
    assert join_arguments([TOKEN], {}) == [TOKEN]


def test_at_file_reads_the_token_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"\n  {TOKEN}\n")
    assert join_arguments([f"@{path}", OTHER], {}) == [TOKEN, OTHER]


def test_the_environment_is_used_only_without_join(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    assert join_arguments([], {JOIN_ENV: TOKEN}) == [TOKEN]
    assert join_arguments([], {JOIN_ENV: f"@{path}"}) == [TOKEN]
    assert join_arguments([OTHER], {JOIN_ENV: TOKEN}) == [OTHER]  # the command line wins
    assert join_arguments([], {JOIN_ENV: "  "}) == []
    assert join_arguments([], {}) == []


@pytest.mark.parametrize(("content", "match"), [
    (None, "cannot read the token file: No such file"),
    ("", "the file is empty"),
    (f"{TOKEN}\n{OTHER}\n", "more than one word"),
])
def test_an_unusable_token_file_is_one_clear_error(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    for args, env, where in (([f"@{path}"], {}, "--join"), ([], {JOIN_ENV: f"@{path}"}, JOIN_ENV)):
        with pytest.raises(MeshError, match=match) as caught:
            join_arguments(args, env)
        assert str(caught.value).startswith(f"{where} @{path}: ")
        assert "\n" not in str(caught.value)


def test_joined_credentials_are_not_saved_until_a_member_accepts_them(tmp_path: Path) -> None:
    mine = load_or_create_mesh(tmp_path)  # a new mesh, saved at once
    assert load_or_create_mesh(tmp_path) == mine
    joining = InviteToken.decode(TOKEN).credentials
    assert load_or_create_mesh(tmp_path, joining=joining) == joining
    assert load_or_create_mesh(tmp_path) == mine  # a token nobody accepted did not replace them
    save_mesh(tmp_path, joining)
    assert load_or_create_mesh(tmp_path) == joining
    assert (tmp_path / MESH_FILE).stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / MESH_FILE).read_text())["mesh"] == joining.mesh_id


@pytest.mark.parametrize("refusal", list(Refusal))
def test_a_refusal_is_one_line_naming_the_check(refusal: Refusal, tmp_path: Path) -> None:
    refused = JoinRefused("127.0.0.2:7000", refusal)
    token = refusal_message(refused, token=True)
    assert token.startswith(f"--join: the mesh at 127.0.0.2:7000 refused this token: {refusal} (")
    saved = refusal_message(refused, token=False, state_dir=tmp_path)
    assert saved.startswith(f"the mesh at 127.0.0.2:7000 refused the credentials saved in {tmp_path / MESH_FILE}: "
                            f"{refusal} (")
    for line in (token, saved):
        assert "\n" not in line and "meshllm token" in line
