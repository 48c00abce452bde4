"""What JPEG draft decoding does to CLIP's input and embedding (score's default for the CLIP branch).

    python bench/bench_draft.py --sizes 640x480,1024x768,2048x1536 --model ViT-L-14-quickgelu

For each photograph of `latentmill.curate.samples` (scikit-image's) at each size, saved as a quality-90
JPEG, CLIP's preprocessed input is made twice: from the full decode and from the draft decode score uses
(`decode_image(..., draft_size=(224, 224))`). Reported: the input difference in normalised units (max and
mean |difference|) and the cosine between the two image embeddings of the model. The model has random
weights (no hub here): the embedding figure is a proxy; the input figures do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="640x480,1024x768,2048x1536")
    parser.add_argument("--model", default="ViT-L-14-quickgelu")
    args = parser.parse_args()
    import torch

    from latentmill.curate import samples
    from latentmill.curate.imageshards import decode_image
    from latentmill.filters.clip import load_clip

    torch.manual_seed(0)
    clip = load_clip(args.model, "none")
    results = {}
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        inputs_full, inputs_draft = [], []
        for name in samples.PHOTOS:
            data = samples.encode(samples.photo(name, w, h), "jpg", quality=90)
            inputs_full.append(clip.preprocess(decode_image(data)))
            inputs_draft.append(
                clip.preprocess(decode_image(data, draft_size=(clip.image_size, clip.image_size)))
            )
        full, draft = torch.stack(inputs_full), torch.stack(inputs_draft)
        with torch.inference_mode():
            a, b = clip.embed_images(full), clip.embed_images(draft)
        cosine = torch.nn.functional.cosine_similarity(a.float(), b.float()).numpy()
        diff = (full - draft).abs()
        results[size] = {
            "images": len(inputs_full),
            "input_max_abs": round(float(diff.max()), 3),
            "input_mean_abs": round(float(diff.mean()), 4),
            "embedding_cosine_min": round(float(cosine.min()), 5),
            "embedding_cosine_mean": round(float(np.mean(cosine)), 5),
        }
        print(size, results[size], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
