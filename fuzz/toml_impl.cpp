// toml++'s implementation, compiled once into the fuzz build (TOML_HEADER_ONLY=0 for the
// rest), so that it carries the fuzzer's coverage and the sanitizers' checks.
#define TOML_IMPLEMENTATION
#include <toml++/toml.h>
