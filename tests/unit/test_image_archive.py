"""module_utils.image_archive and app.yml's images: an image archive's ID read without podman (the
SHA-256 of its config, computed here by hand), and each mistake named with its app.yml entry."""

import hashlib
import io
import json
import tarfile

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import app_folder, image_archive
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
CONFIG_ID = hashlib.sha256(CONFIG).hexdigest()


def _archive(path, manifest=None, files=None, mode="w"):
    """A docker-archive as podman save writes one: manifest.json, <id>.json (the config), a layer."""
    files = {f"{CONFIG_ID}.json": CONFIG, "layer.tar": b"\0" * 1024} if files is None else files
    if manifest is None:
        manifest = [{"Config": f"{CONFIG_ID}.json", "RepoTags": ["localhost/web:1"], "Layers": ["layer.tar"]}]
    with tarfile.open(path, mode) as tar:
        for name, data in {"manifest.json": json.dumps(manifest).encode(), **files}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_the_archive_gives_the_config_digest_and_the_names(tmp_path):
    image = image_archive.read_archive(_archive(tmp_path / "web.tar"), "f")
    assert image.id == CONFIG_ID and image.names == ("localhost/web:1",)
    # Compressed archives (podman load reads them too), and "./"-prefixed member names.
    gz = _archive(tmp_path / "web.tar.gz", mode="w:gz",
                  manifest=[{"Config": f"./{CONFIG_ID}.json", "RepoTags": ["a:1", "b:2"], "Layers": ["./layer.tar"]}])
    assert image_archive.read_archive(gz, "f").names == ("a:1", "b:2")


@pytest.mark.parametrize("make, words", [
    (lambda p: str(p / "none.tar"), "does not exist (podman save --format docker-archive -o FILE NAME writes one)"),
    (lambda p: (p / "x.tar").write_text("not a tar") and str(p / "x.tar"), "is not a tar archive"),
    (lambda p: _archive(p / "x.tar", files={}), "has no image config"),
    (lambda p: _archive(p / "x.tar", manifest=[]), "holds 0 images: an archive must hold one image"),
    (lambda p: _archive(p / "x.tar", manifest=[{"Config": "c.json", "RepoTags": [], "Layers": []}],
                        files={"c.json": CONFIG}), "holds an image without a name (RepoTags)"),
    (lambda p: _archive(p / "x.tar", files={f"{CONFIG_ID}.json": CONFIG}), "lacks the layer 'layer.tar'"),
    (lambda p: _archive(p / "x.tar", manifest=[{"Config": f"{'0' * 64}.json", "RepoTags": ["a:1"], "Layers": []}],
                        files={f"{'0' * 64}.json": CONFIG}), f"hashes to sha256:{CONFIG_ID}, not to its name"),
])
def test_what_is_no_image_archive_is_named(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(DstackError) as err:
        image_archive.read_archive(path, "app.yml: images[0].archive")
    assert str(err.value).startswith("app.yml: images[0].archive: ") and words in str(err.value), str(err.value)


def test_an_image_id_takes_either_form():
    assert image_archive.image_id("sha256:" + "AB" * 32, "id") == "ab" * 32
    for bad in ("ab" * 31, "sha512:" + "ab" * 32, 7, "ab" * 32 + "\nx"):
        with pytest.raises(DstackError, match="^id: must be an image ID"):
            image_archive.image_id(bad, "id")


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    (folder / "image").mkdir(parents=True)
    (folder / "docker-compose.yaml").write_text("services:\n  web:\n    image: localhost/web:1\n")
    _archive(folder / "image" / "web.tar")
    return folder


def test_app_yml_images_are_the_archives_and_the_names(notes):
    (notes / "app.yml").write_text("images:\n  - archive: image/web.tar\n  - name: localhost/other:2\n")
    app = app_folder.read(str(notes))
    yml = f"{notes}/app.yml"
    assert app.images == [{"entry": f"{yml}: images[0]", "archive": f"{notes}/image/web.tar"},
                          {"entry": f"{yml}: images[1]", "name": "localhost/other:2"}]

    class Store:  # the controller's podman store: only the name's ID is asked
        @staticmethod
        def image_id(ref):
            return {"localhost/other:2": "cd" * 32}.get(ref)

    assert app_folder.image_list(app, Store()) == [
        {"entry": f"{yml}: images[0]", "id": CONFIG_ID, "names": ["localhost/web:1"], "archive": f"{notes}/image/web.tar"},
        {"entry": f"{yml}: images[1]", "id": "cd" * 32, "names": ["localhost/other:2"], "archive": ""}]
    # The archives are read by image_list only: an outsider verifying the app needs none of them.
    (notes / "image" / "web.tar").unlink()
    assert app_folder.read(str(notes)).images == app.images
    with pytest.raises(DstackError, match=r"images\[0\]\.archive: .*web.tar does not exist"):
        app_folder.image_list(app, Store())


@pytest.mark.parametrize("images, words", [
    ("image/web.tar", "images: must be a list of {archive: FILE} or {name: IMAGE}"),
    ("[image/web.tar]", "images[0]: must be {archive: FILE}"),
    ("[{archive: image/web.tar, name: x}]", "images[0]: must be {archive: FILE}"),
    ("[{file: image/web.tar}]", "images[0]: must be {archive: FILE}"),
    ("[{archive: ''}]", "images[0].archive: must be the path of an image archive"),
    ("[{name: 'two words'}]", "images[0].name: must be an image name"),
])
def test_each_bad_images_entry_is_named_with_its_file(notes, images, words):
    (notes / "app.yml").write_text(f"images: {images}\n")
    with pytest.raises(DstackError) as err:
        app_folder.read(str(notes))
    assert str(err.value).startswith(f"{notes}/app.yml: ") and words in str(err.value), str(err.value)


def test_a_name_the_controller_lacks_is_named(notes):
    (notes / "app.yml").write_text("images:\n  - name: localhost/missing:1\n")

    class Store:
        @staticmethod
        def image_id(ref):
            return None

    with pytest.raises(DstackError, match=r"app.yml: images\[0\]\.name: localhost/missing:1 is not in the "
                                          r"controller's podman store"):
        app_folder.image_list(app_folder.read(str(notes)), Store())
