// Replays seed corpora through a fuzz target without libFuzzer: calls the target's
// LLVMFuzzerTestOneInput on every file of each folder (or on each file) given, so the
// targets build and run in every build (ctest runs one replay per target). A broken
// invariant aborts; the last "replaying" line names the input.
//   fuzz_replay_TARGET DIR|FILE...
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace fs = std::filesystem;

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s DIR|FILE...\n", argv[0]);
        return 2;
    }
    std::size_t total = 0;
    for (int a = 1; a < argc; ++a) {
        std::vector<fs::path> inputs;
        std::error_code ec;
        if (fs::is_directory(argv[a], ec)) {
            for (auto& e : fs::directory_iterator(argv[a], ec))
                if (e.is_regular_file()) inputs.push_back(e.path());
            std::sort(inputs.begin(), inputs.end());
        } else if (fs::is_regular_file(argv[a], ec)) {
            inputs.emplace_back(argv[a]);
        }
        if (inputs.empty()) {
            // An empty or missing corpus would make the replay pass without testing anything.
            std::fprintf(stderr, "%s: no inputs in '%s'\n", argv[0], argv[a]);
            return 1;
        }
        for (auto& p : inputs) {
            std::ifstream in(p, std::ios::binary);
            if (!in) {
                std::fprintf(stderr, "%s: cannot read '%s'\n", argv[0], p.c_str());
                return 1;
            }
            std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
            std::fprintf(stderr, "replaying %s (%zu bytes)\n", p.c_str(), bytes.size());
            // A copy of exactly the input's size, as libFuzzer hands it, so that ASan sees
            // a read past the end.
            std::vector<std::uint8_t> data(bytes.begin(), bytes.end());
            LLVMFuzzerTestOneInput(data.data(), data.size());
            ++total;
        }
    }
    std::printf("%zu inputs replayed\n", total);
    return 0;
}
