"""Known pretrained models: where they come from and, when known, where to download them from.

A plain dict, ``name -> entry``; :meth:`CellPLM.from_pretrained <scvi_cellplm.CellPLM.from_pretrained>`
reads it. An entry holds:

``source_page``
    Where the authors distribute the model (and say how to cite it).
``files``
    The files of the model, ``file name -> direct download address`` (``None``: no stable direct
    address is known, e.g. a shared-folder link on the source page).
``sha256``
    ``file name -> sha256`` of each file, or ``None`` when the checksums are not known. A model is
    downloaded only when every file has an address and a checksum; otherwise ``from_pretrained``
    says to download it by hand.
``latent``
    The latent distribution of the model (``"gmvae"`` or ``"vae"``).
``description``
    One line for people.

Add an entry (a model of your own, with its addresses and checksums) to make it loadable by name.
"""

from __future__ import annotations

OFFICIAL_SOURCE_PAGE = "https://github.com/OmicsML/CellPLM"
"""The CellPLM authors' repository; its README links the official checkpoints (a shared folder)."""


def _official(name: str, latent: str, description: str) -> dict:
    return {
        "source_page": OFFICIAL_SOURCE_PAGE,
        "files": {f"{name}.config.json": None, f"{name}.best.ckpt": None},
        "sha256": None,  # not published; never verified by this package
        "latent": latent,
        "description": description,
    }


PRETRAINED: dict[str, dict] = {
    "20230926_85M": _official("20230926_85M", "gmvae", "Official CellPLM checkpoint of the paper (Wen et al., "
                              "ICLR 2024): 85M parameters, Gaussian-mixture latent."),
    "20231027_85M": _official("20231027_85M", "vae", "Official CellPLM checkpoint, later release: 85M "
                              "parameters, Gaussian (VAE) latent."),
}
"""Pretrained models by name (see the module docstring for the fields of an entry)."""
