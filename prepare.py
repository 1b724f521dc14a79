"""Convert a training split into litdata shards once: python prepare.py imagenet --root data/imagenet --out
data/imagenet_shards (then train with data.streaming=data/imagenet_shards). See docs/scaling.md."""

from dmae_lightning.data.prepare import main

if __name__ == "__main__":
    main()
