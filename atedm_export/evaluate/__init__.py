"""``atedm-export eval``: the same prompts and seeds through the unpruned graph and through each build, scored.

- ``prompts.py``  where the prompts come from: a text file, COCO captions, or the built-in set
- ``builds.py``   which builds can be compared (one model, size, batch, precision) and their labels and identities
- ``state.py``    the folder's record of every image drawn, so a rerun reuses what still matches
- ``run.py``      drawing the images: one pipeline per build, each image timed, resumable
- ``metrics.py``  thin adapters over torchmetrics (PSNR, SSIM, LPIPS, CLIP score, FID, KID) and the files they load
- ``score.py``    the metrics over the image folders, streamed in batches
- ``report.py``   rows for the table, eval.json, eval.csv, grid.png, quality-speed.png

``request.py`` checks every input before anything is drawn or written and holds the plan the others share.
"""
