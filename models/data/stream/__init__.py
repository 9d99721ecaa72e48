"""Behaviour samples larger than memory: read in chunks, encoded once, shuffled in a window.

The flow of a streaming run (`models.training.behavior_task.prepare_behavior_data`):

1. `source.SampleSource`: one file or a directory of files, read as validated Arrow chunks;
2. a first pass counts ids (`models.data.vocab`) and fits the vocabularies;
3. a second pass encodes every chunk (`models.data.encode`) and appends it to
   `shards.Shards`: one binary file per column, written once, read back by row ranges;
4. `order.EpochOrder`: each epoch, a seeded permutation of blocks of rows, a part per rank,
   shuffled within a bounded window, so memory holds one window, never the data set.
"""
