// Host-memory tier hash map (torch custom class). Placeholder until the tier lands: registers nothing.
#include <torch/library.h>

namespace hps {
void register_host_map_class(torch::Library& m) { (void)m; }
}  // namespace hps
