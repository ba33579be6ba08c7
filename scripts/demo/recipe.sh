# Sourced by scripts/demo/train_demo.sh and scripts/device/: the demo's pipeline folder and the
# transformer's training recipe, in one place (run from the repository root).

# The T5, scheduler and model_index.json are the pipeline fixtures' (random, shipped, never
# trained); the CLIP and VAE are the recipe's own (WORK/clip, WORK/vae).
DEMO_ENCODERS=tests/fixtures/pipeline/schnell/diffusers

# demo_pipeline WORK DIR: DIR becomes a pipeline folder on WORK's CLIP and VAE, with the fixture
# transformer standing in until the trained one exists (--init random replaces it).
demo_pipeline() {
  rm -rf "$2" && mkdir -p "$2/transformer"
  cp -r "$1/clip" "$2/text_encoder"
  cp -r "$DEMO_ENCODERS/text_encoder_2" "$DEMO_ENCODERS/scheduler" "$DEMO_ENCODERS/model_index.json" "$2/"
  cp -r "$1/vae" "$2/vae"
  cp "$DEMO_ENCODERS/transformer/"* "$2/transformer/"
}

# `atelier train` options every demo transformer run shares. The text encoders train with the
# transformer (--train-text-encoders): from frozen random encoders the transformer learned the
# names only after hundreds of epochs (issue 17's notes), with trained ones every word's embedding
# learns what it draws. T5 length 8: the text stream is most
# of a step's work (8 tokens instead of 32 make a step 2.1× faster on 2 cores); 93% of the names
# fit whole (24 of 1911 share their first 8 tokens with another). The length is recorded in the
# file, so generation pads to it too.
DEMO_TRANSFORMER_ARGS=(--max-images 5000 --full --init random --transformer-config scripts/demo/transformer.json
  --lr-schedule cosine --resolution 64 --max-sequence-length 8 --caption-dropout 0 --save-dtype f16
  --train-text-encoders)
