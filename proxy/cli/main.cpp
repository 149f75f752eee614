#include <exception>
#include <iostream>
#include <map>

#include "commands.hpp"
#include "dmz/proxy/version.hpp"

int main(int argc, char** argv) {
    CLI::App app{"dmzproxy: two-tier publishing reverse proxy for Exchange, with an offline rule tester"};
    app.set_version_flag("--version", dmz::proxy::version_string());
    app.require_subcommand(1);
    std::map<CLI::App*, dmz::cli::command> commands;
    auto add = [&](dmz::cli::command (*f)(CLI::App&)) {
        auto before = app.get_subcommands({});
        auto cmd = f(app);
        auto after = app.get_subcommands({});
        commands[after.back()] = std::move(cmd);
        (void)before;
    };
    add(&dmz::cli::add_check);
    add(&dmz::cli::add_explain);
    add(&dmz::cli::add_run);
    add(&dmz::cli::add_certs);
    add(&dmz::cli::add_lab);
    add(&dmz::cli::add_diagnose);
    add(&dmz::cli::add_users);
    add(&dmz::cli::add_reload);
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::cerr << "dmzproxy: " << e.what() << "\n(run 'dmzproxy --help' or 'dmzproxy COMMAND --help')\n";
        return 2;
    }
    try {
        for (auto& [sub, cmd] : commands)
            if (sub->parsed()) return cmd();
    } catch (const std::invalid_argument& e) {
        std::cerr << "dmzproxy: " << e.what() << "\n";
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "dmzproxy: error: " << e.what() << "\n";
        return 1;
    }
    return 2;
}
