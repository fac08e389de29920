"""The paper's ImageNette experiment (section V, Table II, Fig. 2) in small: the same network
trained from the same initialisation conventionally and with its first two blocks
streamed, on real labelled images, loss curves compared step by step.

Run from the repository root::

    python -m examples.equivalence                   # about two minutes on 2 CPU cores
    python -m examples.equivalence --dtype float64   # the same in float64 (differences ~1e-15)
    python -m examples.equivalence --size 320 --epochs 300 --lr 1e-3   # the paper's settings (hours on a CPU)

It writes ``results/equivalence/equivalence_<dtype>.md`` (the command, the set-up and a
table per epoch: mean loss each way, largest |difference| of step losses, tuning loss and
accuracy each way), ``equivalence_<dtype>.png`` (both loss curves on one panel, streamed
dashed over conventional; |difference| per step on a log axis below) and
``steps_<dtype>.csv`` (every step's losses), and prints the table.

Choices, where the paper is silent or our budget is smaller:

- Data. ImageNette cannot be had offline through a package registry. scikit-image's wheel
  ships real photographs, among them three textures (brick, grass, gravel), a Hubble deep
  field (stars) and an immunohistochemistry image (tissue): five pictures in which any crop
  shows its class, so "which texture is this crop" is a real labelled task, and they come
  with one ``pip download`` of a pinned wheel, read from its zip and checked by SHA-256
  (scikit-image is not installed). Crops of the example slide would give one picture with
  labels we would have to invent (tissue against glass); the textures give five classes
  with nothing invented. All five are used in greyscale (the three textures are grey), so
  colour alone gives no class away; the grey image is repeated over the three input
  channels, as the authors' code does for grey ImageNet images. Each picture's 512 x 512
  centre is cut into 4 x 4 cells of 128 x 128: the top three rows are training images, the
  bottom row tuning images (12 and 4 per class), so no tuning pixel is seen in training.
  Augmentation as in the paper: random-resized crops (8%-100% of a cell's area, aspect
  3/4-4/3) resized to the input size for training, whole cells for tuning, normalised with
  the training cells' mean and std.
- Network. Table II lists kernels and channels but no strides or padding. Its last pool is
  10 x 10 on a 320 x 320 input and feeds a 256-to-10 linear layer, so it is global, which
  needs a 10 x 10 map: a total stride of 32, i.e. four 2 x 2 max-pools and a stride-2 first
  convolution (as in the authors' public notebook). Padding is "same" (3 for 7 x 7, 1 for
  3 x 3), so 320 maps to exactly 10 x 10; the authors' notebook pads the 7 x 7 by 2 and
  ends on 9 x 9. The last pool is written as a global max-pool, so smaller inputs work.
  ReLU after every convolution. The trunk (streamed) is the first two blocks, as in the
  paper.
- Tiles. The paper streams a 320 x 320 input in four tiles of 160 x 160, counted without
  their halo; ``tile_size`` here includes the halo, so by default the tile is the smallest
  that gives a 2 x 2 grid (168 at 320, 88 at the default 160). A tile that covers the whole
  input is refused: the comparison would be empty.
- Budget. The default input is 160 x 160 (a quarter of the paper's pixels), 30 epochs of
  60 crops (450 steps; the paper ran 300 epochs of 1000 images) and SGD with learning rate
  1e-2: at the paper's 1e-3 the loss falls by only 0.01 in 450 steps here, and a curve that
  hardly moves would test little. ``--lr 1e-3`` restores the paper's rate. Batch 4 and
  float32, as in the paper.
- Sameness. One seeded initial state_dict is loaded into both models; the training order
  comes from :class:`lightning_streaming.EpochSampler` (reshuffled per epoch from the seed)
  and every crop is seeded by (seed, epoch, index), so both runs see identical batches. The
  only difference is the Trainer's strategy: Lightning's default (the trunk runs whole) or
  ``ls.StreamingStrategy(tile_size=...)``. A hook on the first convolution counts the input
  sizes it runs on, to show that the streamed run really ran tiles.
- Yardstick. "Agree to float rounding" needs a scale: in float32 a third run trains
  conventionally in float64 from the same state on the same batches, and the report sets
  the streaming difference against the float32-vs-float64 difference (``--no-reference``
  skips it). Two float32 runs each carry their own rounding error, so their difference is
  expected near 1.4 times one run's; the verdict allows 2 times. In float64 the verdict
  asks for a relative difference below 1e-10.

What to expect (measured with the defaults on a 2-core CPU): in float64 the curves differ
by at most about 1e-15 for the whole run. In float32 the first steps differ by about 1e-7,
and the difference grows over the run to about 1e-1 at the default learning rate (about
1e-5 at the paper's 1e-3), just as the float32-vs-float64 difference does: once a rounding
difference flips a ReLU or a max-pool's choice, the two runs take slightly different steps
(the paper, too, reports small differences that accumulate in later epochs).
"""

from .experiment import Comparison, RunResult, Settings, compare, four_tile_size, train
from .network import TableTwoNet
from .report import closing_note, markdown, plot, write_report
from .textures import TextureImages, TrainingCrops, TuningCells, fetch_textures, load_textures, random_resized_box

__all__ = [
    "Comparison",
    "RunResult",
    "Settings",
    "TableTwoNet",
    "TextureImages",
    "TrainingCrops",
    "TuningCells",
    "closing_note",
    "compare",
    "fetch_textures",
    "four_tile_size",
    "load_textures",
    "markdown",
    "plot",
    "random_resized_box",
    "train",
    "write_report",
]
