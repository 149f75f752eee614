#pragma once
// Subcommands of the dmzproxy executable. Each returns the process exit code:
// 0 ok, 1 findings or a denial, 2 usage or parse error.
#include <CLI/CLI.hpp>

#include <functional>

namespace dmz::cli {

using command = std::function<int()>;

command add_check(CLI::App& app);
command add_explain(CLI::App& app);
command add_run(CLI::App& app);
command add_certs(CLI::App& app);
command add_lab(CLI::App& app);
command add_diagnose(CLI::App& app);
command add_users(CLI::App& app);

}  // namespace dmz::cli
