"""Tiny randomly initialised reward models, saved to tmp folders the way real checkpoints are shipped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def random_videos(b: int, t: int = 3, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> dict[str, str]:
    """An open_clip model config JSON plus an HPS-style ``{"state_dict": ...}`` checkpoint of random weights."""
    import open_clip

    root = tmp_path_factory.mktemp("open_clip")
    config = root / "tiny-clip-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    checkpoint = root / "tiny_hps.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    mlp_path = root / "aesthetic_mlp.pth"
    from rewards.clip import AestheticMLP

    torch.save(AestheticMLP(embed_dim=TINY_CLIP["embed_dim"]).state_dict(), mlp_path)
    return {"arch": str(config), "checkpoint": str(checkpoint), "mlp_checkpoint": str(mlp_path)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table used to spell byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer_files(folder: Path, num_merges: int = 2000) -> int:
    """vocab.json + merges.txt from open_clip's bundled CLIP BPE (first ``num_merges`` merges); returns vocab size."""
    import open_clip.tokenizer as tok

    lines = gzip.open(tok.default_bpe()).read().decode("utf-8").split("\n")[1 : num_merges + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory) -> str:
    """A tiny transformers CLIPModel + CLIPProcessor saved with save_pretrained into one folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("pickscore")
    vocab_size = write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=vocab_size - 1,
                         bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)
