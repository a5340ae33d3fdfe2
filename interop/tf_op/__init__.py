"""The HpsLookup TensorFlow custom op: its C++ source (hps_lookup_op.cc) and the build that compiles it."""
