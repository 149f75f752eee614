#pragma once
// Subcommands of the dmzproxy executable. Each returns the process exit code:
// 0 ok, 1 findings or a denial, 2 usage or parse error.
#include <CLI/CLI.hpp>

#include <functional>
#include <nlohmann/json.hpp>
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

/// One answer of an admin endpoint: `status` 0 and `error` set when it could not be asked.
struct admin_reply {
    int status = 0;
    nlohmann::json body;  ///< discarded when not JSON
    std::string error;
};

/// METHOD TARGET to an admin endpoint ("http://HOST:PORT"), with the bearer token when
/// there is one, waiting at most `timeout` seconds for each read and write.
admin_reply admin_call(const std::string& url, const std::string& method, const std::string& target, const std::string& token,
                       double timeout);

/// The token file's first line, without surrounding white space; false when unreadable.
bool read_token_file(const std::string& file, std::string& token);

/// POST /reload to an instance's admin endpoint (dmzproxy reload, lab reload): 0 reloaded,
/// 1 refused (why in `err`), 2 unreachable.
int reload_instance(const std::string& url, const std::string& token, double timeout, std::string& out, std::string& err);

}  // namespace dmz::cli
