"""Path confinement: a hostile-path corpus against resolve_allowed_path / read_file_capped."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vlm_tools.errors import ImageTooLarge, PathNotAllowed
from vlm_tools.images.paths import path_from_file_url, read_file_capped, resolve_allowed_path

pytestmark = pytest.mark.timeout(10)  # a FIFO that blocks a reader must fail the test, not hang it


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """An allowed root with a file, a sibling directory sharing its name prefix, and an outside directory."""
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "sub").mkdir()
    (root / "pic.png").write_bytes(b"inside")
    (root / "sub" / "deep.png").write_bytes(b"deep")
    sibling = tmp_path / "allowed_x"
    sibling.mkdir()
    (sibling / "pic.png").write_bytes(b"sibling")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (root / "link-out.png").symlink_to(outside / "secret.png")
    (root / "link-dir-out").symlink_to(outside, target_is_directory=True)
    (root / "link-in.png").symlink_to(root / "pic.png")
    (root / "dangling.png").symlink_to(root / "nothing-here.png")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    os.mkfifo(root / "fifo.png")
    return {"root": root, "sibling": sibling, "outside": outside, "tmp": tmp_path}


# (case id, path builder, expected: bytes read, or a (error, message fragment) pair)
Case = tuple[str, Callable[[dict[str, Path]], str], object]
CASES: list[Case] = [
    ("plain-file", lambda t: str(t["root"] / "pic.png"), b"inside"),
    ("nested-file", lambda t: str(t["root"] / "sub" / "deep.png"), b"deep"),
    ("dotdot-inside", lambda t: str(t["root"] / "sub" / ".." / "pic.png"), b"inside"),
    ("symlink-to-root-file", lambda t: str(t["root"] / "link-in.png"), b"inside"),
    ("dotdot-escape", lambda t: str(t["root"] / ".." / "outside" / "secret.png"),
     (PathNotAllowed, "outside the allowed")),
    ("deep-dotdot-escape", lambda t: str(t["root"] / "sub" / ".." / ".." / ".." / ".." / "etc" / "passwd"),
     (PathNotAllowed, "outside the allowed")),
    ("symlink-out", lambda t: str(t["root"] / "link-out.png"), (PathNotAllowed, "outside the allowed")),
    ("symlinked-dir-out", lambda t: str(t["root"] / "link-dir-out" / "secret.png"), (PathNotAllowed, "outside")),
    ("prefix-sibling", lambda t: str(t["sibling"] / "pic.png"), (PathNotAllowed, "outside the allowed")),
    ("prefix-sibling-string", lambda t: str(t["root"]) + "_x/pic.png", (PathNotAllowed, "outside the allowed")),
    ("absolute-outside", lambda t: "/etc/passwd", (PathNotAllowed, "add --allow-path DIR")),
    ("missing-inside", lambda t: str(t["root"] / "nope.png"), (PathNotAllowed, "not found")),
    ("missing-outside-says-outside", lambda t: str(t["outside"] / "nope.png"), (PathNotAllowed, "outside the allowed")),
    ("dangling-symlink", lambda t: str(t["root"] / "dangling.png"), (PathNotAllowed, "not found")),
    ("symlink-loop", lambda t: str(t["root"] / "loop-a"), (PathNotAllowed, "")),
    ("nul-byte", lambda t: str(t["root"] / "pic.png") + "\x00.jpg", (PathNotAllowed, "NUL")),
    ("directory", lambda t: str(t["root"] / "sub"), (PathNotAllowed, "a directory")),
    ("root-itself", lambda t: str(t["root"]), (PathNotAllowed, "a directory")),
    ("fifo", lambda t: str(t["root"] / "fifo.png"), (PathNotAllowed, "a FIFO")),
    ("dev-zero", lambda t: "/dev/zero", (PathNotAllowed, "outside the allowed")),
    ("dev-null", lambda t: "/dev/null", (PathNotAllowed, "outside the allowed")),
    ("empty", lambda t: "", (PathNotAllowed, "empty")),
    ("blank", lambda t: "   ", (PathNotAllowed, "empty")),
    ("too-long", lambda t: "/" + "a" * 5000, (PathNotAllowed, "longer than")),
    ("long-component", lambda t: str(t["root"] / ("a" * 300)), (PathNotAllowed, "")),
]


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_paths(tree: dict[str, Path], build: Callable[[dict[str, Path]], str], expected: object) -> None:
    raw = build(tree)
    roots = [tree["root"]]
    if isinstance(expected, bytes):
        assert read_file_capped(resolve_allowed_path(raw, roots), 1000) == expected
        return
    error, fragment = expected  # type: ignore[misc]
    with pytest.raises(error) as caught:
        read_file_capped(resolve_allowed_path(raw, roots), 1000)
    assert fragment in str(caught.value)
    assert str(caught.value).startswith("path_not_allowed: ")


def test_devices_refused_even_inside_a_root() -> None:
    for device in ("/dev/zero", "/dev/null", "/dev/urandom"):
        with pytest.raises(PathNotAllowed, match="character device"):
            resolve_allowed_path(device, [Path("/dev")])


def test_relative_path_resolves_against_working_directory(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree["root"] / "sub")
    assert resolve_allowed_path("deep.png", [tree["root"]]) == tree["root"] / "sub" / "deep.png"
    assert resolve_allowed_path("../pic.png", [tree["root"]]) == tree["root"] / "pic.png"
    with pytest.raises(PathNotAllowed, match="outside"):
        resolve_allowed_path("../../outside/secret.png", [tree["root"]])


def test_home_path_is_expanded(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tree["root"]))
    assert resolve_allowed_path("~/pic.png", [tree["root"]]) == tree["root"] / "pic.png"
    monkeypatch.setenv("HOME", str(tree["outside"]))
    with pytest.raises(PathNotAllowed, match="outside"):
        resolve_allowed_path("~/secret.png", [tree["root"]])


def test_unknown_user_home_is_refused(tree: dict[str, Path]) -> None:
    with pytest.raises(PathNotAllowed):
        resolve_allowed_path("~no_such_user_vlm_tools/pic.png", [tree["root"]])


def test_several_roots_and_message_lists_them(tree: dict[str, Path]) -> None:
    roots = [tree["root"], tree["sibling"]]
    assert resolve_allowed_path(str(tree["sibling"] / "pic.png"), roots) == tree["sibling"] / "pic.png"
    with pytest.raises(PathNotAllowed) as caught:
        resolve_allowed_path(str(tree["outside"] / "secret.png"), roots)
    assert str(tree["root"]) in str(caught.value) and str(tree["sibling"]) in str(caught.value)


def test_root_given_through_a_symlink_is_resolved(tree: dict[str, Path]) -> None:
    alias = tree["tmp"] / "alias"
    alias.symlink_to(tree["root"], target_is_directory=True)
    assert resolve_allowed_path(str(tree["root"] / "pic.png"), [alias]) == tree["root"] / "pic.png"


def test_size_cap(tree: dict[str, Path]) -> None:
    path = tree["root"] / "pic.png"  # 6 bytes
    assert read_file_capped(path, 6) == b"inside"
    with pytest.raises(ImageTooLarge, match="--max-file-bytes"):
        read_file_capped(path, 5)


def test_read_refuses_a_fifo_swapped_in_after_the_check(tree: dict[str, Path]) -> None:
    with pytest.raises(PathNotAllowed, match="FIFO"):
        read_file_capped(tree["root"] / "fifo.png", 1000)  # opened non-blocking: must not hang


def test_read_refuses_a_symlink_swapped_in_after_the_check(tree: dict[str, Path]) -> None:
    with pytest.raises(PathNotAllowed, match="symlink"):
        read_file_capped(tree["root"] / "link-out.png", 1000)


FILE_URLS = [
    ("plain", "file:///tmp/a.png", "/tmp/a.png"),
    ("localhost-host", "file://localhost/tmp/a.png", "/tmp/a.png"),
    ("percent-escapes", "file:///tmp/a%20b.png", "/tmp/a b.png"),
    ("upper-scheme", "FILE:///tmp/a.png", "/tmp/a.png"),
]


@pytest.mark.parametrize(("url", "path"), [f[1:] for f in FILE_URLS], ids=[f[0] for f in FILE_URLS])
def test_file_urls(url: str, path: str) -> None:
    assert path_from_file_url(url) == path


@pytest.mark.parametrize(
    "url",
    ["file://evil.com/etc/passwd", "file:///tmp/a.png?x=1", "file:///tmp/a.png#f", "file:relative.png",
     "file:///tmp/%ff.png", "http://x/a.png"],
    ids=["remote-host", "query", "fragment", "relative", "bad-utf8-escape", "not-file"],
)  # fmt: skip
def test_bad_file_urls(url: str) -> None:
    with pytest.raises(PathNotAllowed):
        path_from_file_url(url)
