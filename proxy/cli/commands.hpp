#pragma once
// Subcommands of the dmzproxy executable. Each returns the process exit code:
// 0 ok, 1 findings or a denial, 2 usage or parse error.
#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace dmz::cli {

using command = std::function<int()>;

command add_check(CLI::App& app);
command add_explain(CLI::App& app);
command add_run(CLI::App& app);
command add_certs(CLI::App& app);
command add_lab(CLI::App& app);
command add_diagnose(CLI::App& app);
command add_users(CLI::App& app);
command add_reload(CLI::App& app);

/// POST /reload to an instance's admin endpoint (dmzproxy reload, lab reload): 0 reloaded,
/// 1 refused (why in `err`), 2 unreachable.
int reload_instance(const std::string& url, const std::string& token, double timeout, std::string& out, std::string& err);

}  // namespace dmz::cli
