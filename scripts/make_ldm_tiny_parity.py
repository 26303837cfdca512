"""Makes ldm_tiny_parity.safetensors: reference outputs of CompVis/latent-diffusion's own modules.

Not part of the test run. It needs a checkout of https://github.com/CompVis/latent-diffusion (made
with a506df5) and ``einops``; nothing of it is copied here, it is imported from ``--ldm``:

    python scripts/make_ldm_tiny_parity.py --ldm /path/to/latent-diffusion \\
        --out tests/fixtures/checkpoints/ldm_tiny_parity.safetensors

A tiny LDM in cin256-v2's block structure (UNet: 4 levels, 2 res blocks, spatial transformers at
8, 4, 2, one head, class context; VQ-f4: 3 levels, 16 codes of dim 3) gets the seeded weights of
``tests/test_ldm_checkpoint.py::ldm_weights``. The file stores the key layout (metadata), the inputs,
the outputs (UNet ε; VQ encode = quant_conv(encoder(x)); VQ decode = nearest code as taming's
VectorQuantizer2, post_quant_conv, decoder) and a per-tensor fingerprint of the weights.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[8, 4, 2],
            num_res_blocks=2, channel_mult=[1, 1, 2, 2], num_heads=1, use_spatial_transformer=True,
            transformer_depth=1, context_dim=32)
DDCONFIG = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)
N_EMBED, EMBED_DIM, N_CLASSES, SEED = 16, 3, 10, 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ldm", required=True, help="a checkout of CompVis/latent-diffusion")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path[:0] = [args.ldm, str(Path(__file__).resolve().parents[1] / "tests")]
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from test_ldm_checkpoint import ldm_weights

    torch.set_num_threads(2)

    class VQ(nn.Module):  # the parameter layout of ldm.models.autoencoder.VQModel (no Lightning, no taming)
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(**DDCONFIG), Decoder(**DDCONFIG)
            self.quantize = nn.Module()
            self.quantize.embedding = nn.Embedding(N_EMBED, EMBED_DIM)
            self.quant_conv = nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1)
            self.post_quant_conv = nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1)

    unet, vq = UNetModel(**UNET).eval(), VQ().eval()
    emb = nn.Embedding(N_CLASSES + 1, UNET["context_dim"])
    layout = {}
    for prefix, m in (("model.diffusion_model.", unet), ("first_stage_model.", vq)):
        layout.update({prefix + k: list(v.shape) for k, v in m.state_dict().items()})
    layout["cond_stage_model.embedding.weight"] = list(emb.weight.shape)
    w = ldm_weights(layout, SEED)

    def sub(p):
        return {k[len(p):]: v for k, v in w.items() if k.startswith(p)}

    unet.load_state_dict(sub("model.diffusion_model."), strict=True)
    vq.load_state_dict(sub("first_stage_model."), strict=True)
    emb.load_state_dict({"weight": w["cond_stage_model.embedding.weight"]})

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([17, 803])
    y = torch.tensor([3, N_CLASSES])  # a class and the unconditional one
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    z_in = torch.randn(1, 3, 8, 8, generator=g)
    with torch.no_grad():
        eps = unet(x, t, context=emb(y[:, None]))  # ClassEmbedder: embedding(batch[key][:, None])
        z_enc = vq.quant_conv(vq.encoder(image))
        zf = z_in.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        e = vq.quantize.embedding.weight
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        zq = e[d.argmin(1)].view(1, 8, 8, EMBED_DIM).permute(0, 3, 1, 2)
        decoded = vq.decoder(vq.post_quant_conv(z_in + (zq - z_in)))
        margin = d.sort(1).values[:, :2].diff(dim=1).min().item()
    print(f"{len(layout)} tensors; nearest-code margin {margin:.2e} (must dwarf float rounding)")
    fingerprint = torch.stack([w[k].double().sum() for k in layout])
    meta = {"layout": json.dumps(layout), "ldm_unet_config": json.dumps(UNET), "ldm_ddconfig": json.dumps(DDCONFIG),
            "n_embed": str(N_EMBED), "embed_dim": str(EMBED_DIM), "num_classes": str(N_CLASSES), "seed": str(SEED),
            "made_by": "CompVis/latent-diffusion@a506df5 openaimodel.UNetModel + diffusionmodules.model "
                       f"Encoder/Decoder; weights tests/test_ldm_checkpoint.py::ldm_weights; torch {torch.__version__}"}
    save_file({"x": x, "t": t, "y": y, "eps": eps, "image": image, "z_enc": z_enc, "z_in": z_in,
               "decoded": decoded, "fingerprint": fingerprint}, args.out, metadata=meta)


if __name__ == "__main__":
    main()
