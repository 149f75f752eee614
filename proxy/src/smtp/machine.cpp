// The SMTP conversation of an `smtp`-mode session, without I/O:
// - it answers EHLO, STARTTLS and AUTH itself;
// - it judges every recipient against the rules (submit or relay);
// - it answers MAIL itself once the sender passes its checks, and sends it upstream with
//   the first RCPT (pipelined when the upstream offers PIPELINING): the upstream's answer
//   to MAIL, if a refusal, is the client's answer to that RCPT (as Postfix's
//   smtpd_delay_reject does), and its answer to each RCPT reaches the client unchanged;
// - it takes DATA (or BDAT chunks, RFC 3030) whole and clean before anything of it goes
//   upstream, and sends it on by BDAT when the upstream offers CHUNKING, else by DATA.
// The client gets 250 at the end of DATA only once the upstream has accepted the message.
#include "machine_impl.hpp"

#include <cstdlib>

#include "dmz/proxy/smtp/replies.hpp"

namespace dmz::smtp {

upstream_capabilities parse_capabilities(const reply& ehlo) {
    upstream_capabilities c;
    for (std::size_t i = 1; i < ehlo.lines.size(); ++i) {
        auto kw = rules::to_lower(ehlo.lines[i].substr(0, ehlo.lines[i].find(' ')));
        if (kw == "8bitmime") c.eight_bit = true;
        if (kw == "size") c.size = true;
        if (kw == "pipelining") c.pipelining = true;
        if (kw == "chunking") c.chunking = true;
        if (kw == "xclient" && rules::contains_nocase(ehlo.lines[i], "login")) c.xclient_login = true;
    }
    return c;
}

namespace detail {

// ---- dispatch --------------------------------------------------------------------------

step machine_impl::on_command(const command& cmd) {
    auto v = to_verb(cmd.verb);
    if (chunks_ && v != verb::bdat && v != verb::rset && v != verb::quit)
        // A BDAT message in progress holds its chunks: only more chunks, RSET or QUIT
        // (so a client cannot keep them alive with other commands).
        return refuse("503 5.5.1 Only BDAT, RSET or QUIT while a BDAT message is in progress");
    switch (v) {
    case verb::ehlo:
    case verb::helo: return helo(cmd);
    case verb::starttls: return starttls(cmd);
    case verb::auth: return auth(cmd);
    case verb::xclient: return xclient(cmd);
    case verb::noop: say("250 2.0.0 OK"); return finish(outcome::ok);
    case verb::rset: return reset_upstream(awaiting::reset_for_rset);
    case verb::quit:
        close_transaction("", "");
        say("221 2.0.0 " + f_.name + " closing connection");
        return finish(outcome::end);
    case verb::vrfy: say("252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"); return finish(outcome::ok);
    case verb::help: say("214 2.0.0 https://www.rfc-editor.org/rfc/rfc5321"); return finish(outcome::ok);
    case verb::mail: return mail(cmd);
    case verb::rcpt: return rcpt(cmd);
    case verb::data: return data(cmd);
    case verb::bdat: return bdat(cmd);
    case verb::expn:
    case verb::turn:
    case verb::etrn: return refuse("502 5.5.1 " + cmd.verb + " is not implemented");
    case verb::unknown: break;
    }
    return refuse("500 5.5.2 Syntax error, command unrecognized");
}

step machine_impl::on_upstream_reply(const reply& r) {
    auto a = std::exchange(awaiting_, awaiting::none);
    switch (a) {
    case awaiting::xclient: return on_xclient_reply(r);
    case awaiting::xclient_ehlo: return on_xclient_ehlo_reply(r);
    case awaiting::mail: return on_mail_reply(r);
    case awaiting::mail_rcpt:
        if (mail_reply_.code / 100 != 2) return sender_refused(mail_reply_);
        pending_mail_.clear();
        return on_rcpt_reply(r);
    case awaiting::rcpt: return on_rcpt_reply(r);
    case awaiting::data_verb: return on_data_verb_reply(r);
    case awaiting::message: return on_message_reply(r);
    case awaiting::none: break;
    default: return after_reset(a);  // the RSETs: their answer does not matter
    }
    return finish(outcome::ok);
}

step machine_impl::after_reset(awaiting done) {
    switch (done) {
    case awaiting::reset_for_helo: return answer_helo();
    case awaiting::reset_for_rset:
        close_transaction("", "");
        say("250 2.0.0 OK");
        return finish(outcome::ok);
    case awaiting::reset_refused_data_verb: close_transaction(refused_reply_, ""); return finish(outcome::ok);
    case awaiting::reset_refused_data:  // this tier refused it: the refusal is in the fault's detail
    case awaiting::reset_refused_chunks: close_transaction("", ""); return finish(outcome::ok);
    default: return finish(outcome::ok);
    }
}

/// The upstream went away mid-session: tell the client (4xx, so it retries later) and end
/// the session; a message not yet accepted upstream was not accepted here either.
step machine_impl::on_upstream_lost(const std::string& why) {
    say("421 4.4.2 " + f_.name + " (" + f_.instance + "): " + why + "; try again later");
    tx_.fault = make_fault(fault_class::upstream_protocol, 421, why);
    close_transaction("", "");
    upstream_ready_ = false;
    return finish(outcome::end);
}

step machine_impl::on_client_closed(bool timed_out) {
    switch (state_) {
    case state::command:
        if (timed_out)
            say("421 4.4.2 " + f_.name + " closing: no command within " + std::to_string(f_.command_timeout.count() / 1000) + " s");
        // A mail begun and left without DATA or RSET: the client's doing, and not a mail.
        if (in_transaction_)
            tx_.fault = make_fault(fault_class::bad_request, 0,
                                   timed_out ? "timed out in a mail transaction" : "the client closed in a mail transaction");
        close_transaction("", "");
        break;
    case state::data:
    case state::bdat_chunk: {
        // The client vanished mid-message: nothing was forwarded, nothing is lost.
        std::string in = state_ == state::data ? "DATA" : "BDAT";
        tx_.fault = make_fault(fault_class::bad_request, 0, timed_out ? "timed out in " + in : "the client closed in " + in);
        close_transaction("", "");
        break;
    }
    default: break;
    }
    return finish(outcome::end);
}

// ---- MAIL, RCPT ------------------------------------------------------------------------

step machine_impl::mail(const command& cmd) {
    if (ehlo_.empty()) return refuse("503 5.5.1 Send EHLO or HELO first");
    if (in_transaction_) return refuse("503 5.5.1 Nested MAIL command");
    std::string up_line = "MAIL FROM:<" + cmd.path + ">";
    auto bad = mail_parameters(cmd, f_.max_message_size, caps_, up_line);
    if (!bad.empty()) return refuse(bad);
    // The upstream hears MAIL with the first recipient this tier lets through: one round
    // trip fewer per message, and none at all for a transaction refused here.
    in_transaction_ = true;
    tx_.since = clock_type::now();
    tx_.mail_from = cmd.path;
    pending_mail_ = std::move(up_line);
    say("250 2.1.0 Sender OK");
    return finish(outcome::ok);
}

step machine_impl::rcpt(const command& cmd) {
    if (!in_transaction_) return refuse("503 5.5.1 Need MAIL before RCPT");
    if (rcpt_count_ >= f_.max_recipients) {
        say("452 4.5.3 Too many recipients");
        return finish(outcome::ok);
    }
    auto bad = recipient_syntax(cmd);
    if (!bad.empty()) {
        tx_.rcpt_refused.emplace_back(cmd.path, bad);
        return refuse(bad);
    }
    rules::facts f;
    f.listener = f_.listener;
    f.client = f_.client;
    f.who = user_.empty() ? rules::identity::anonymous : rules::identity::authenticated;
    f.user = user_;
    f.mail_from = tx_.mail_from;
    f.rcpt = cmd.path;
    auto d = cb_.evaluate(f);
    if (d.result != rules::verdict::allow) {
        auto reason = recipient_refusal(d);
        say(reason);
        tx_.rcpt_refused.emplace_back(cmd.path, reason);
        // The log says why, recipient by recipient (several may be refused in one mail).
        auto why = "RCPT " + cmd.path + ": " + (d.reason.empty() ? reason : d.reason);
        tx_.fault = make_fault(fault_class::rule_denied, 550, tx_.fault.detail.empty() ? why : tx_.fault.detail + "; " + why, d.rule_name);
        return finish(outcome::ok);
    }
    return forward_rcpt(cmd.path);
}

/// A RCPT upstream, with the transaction's MAIL before it while that is pending (in one
/// write when the upstream offers PIPELINING).
step machine_impl::forward_rcpt(const std::string& path) {
    rcpt_path_ = path;
    rcpt_line_ = "RCPT TO:<" + path + ">";
    if (pending_mail_.empty()) return upstream_command(awaiting::rcpt, rcpt_line_);
    std::string wire = pending_mail_ + "\r\n";
    if (caps_.pipelining) wire += rcpt_line_ + "\r\n";
    up_mail_open_ = true;
    return send_upstream(awaiting::mail, std::move(wire));
}

step machine_impl::on_mail_reply(const reply& m) {
    if (m.code == 421) return sender_refused(m);  // closing: no answer to the RCPT will come
    if (caps_.pipelining) {
        // Read even after a refused MAIL: the upstream answers every pipelined command.
        mail_reply_ = m;
        return send_upstream(awaiting::mail_rcpt, {});
    }
    if (m.code / 100 != 2) return sender_refused(m);
    pending_mail_.clear();
    return upstream_command(awaiting::rcpt, rcpt_line_);
}

/// The refused sender is this recipient's answer; the next RCPT tries MAIL again.
step machine_impl::sender_refused(reply m) {
    // A 552 (message size) would read as "try later" at RCPT (RFC 5321 4.5.3.1.10), so it
    // is passed on as 550 with the same words.
    if (m.code == 552) m.code = 550;
    if (!relay_reply(m)) return finish(outcome::end);
    auto why = reply_text(m);
    tx_.rcpt_refused.emplace_back(rcpt_path_, why);
    tx_.note = "the upstream refused MAIL FROM: " + why;
    return finish(outcome::ok);
}

step machine_impl::on_rcpt_reply(const reply& r) {
    if (!relay_reply(r)) return finish(outcome::end);
    if (r.code / 100 == 2) {
        ++rcpt_count_;
        tx_.rcpt_accepted.push_back(rcpt_path_);
    } else {
        tx_.rcpt_refused.emplace_back(rcpt_path_, reply_text(r));
    }
    return finish(outcome::ok);
}

// ---- DATA, BDAT ------------------------------------------------------------------------

step machine_impl::data(const command& cmd) {
    if (!in_transaction_) return refuse("503 5.5.1 Need MAIL before DATA");
    if (tx_.rcpt_accepted.empty()) return refuse("554 5.5.1 No valid recipients");
    if (!cmd.argument.empty()) return refuse("501 5.5.4 DATA takes no argument");
    say("354 Start mail input; end with <CRLF>.<CRLF>");
    data_.emplace(f_.max_message_size);
    state_ = state::data;
    return next_io(action::read_data);
}

step machine_impl::on_data_end() {
    auto reader = std::move(*data_);
    data_.reset();
    tx_.size = reader.size();
    if (!reader.refusal().empty()) {
        say(reader.refusal());
        tx_.fault = make_fault(fault_class::bad_request, 0, reader.refusal());
        return upstream_command(awaiting::reset_refused_data, "RSET");
    }
    return deliver(reader.take_message(), false);
}

/// BDAT (RFC 3030): exactly <size> octets follow the command, whatever its answer, so they
/// are always read (and dropped when refused) to stay in step with the client.
step machine_impl::bdat(const command& cmd) {
    auto size = bdat_size(cmd.argument, chunk_.last);
    // How many octets follow is unknown: framing in doubt, so say so and stop.
    if (!size) return end_in_doubt("501 5.5.4 Syntax: BDAT <size> [LAST]; closing", "a malformed BDAT command");
    if (*size > f_.max_message_size)
        // Reading and dropping that many octets is no use to anyone: refuse and stop.
        return end_in_doubt("552 5.3.4 A chunk bigger than the maximum message size (" + std::to_string(f_.max_message_size) +
                                "); closing",
                            "a BDAT chunk of " + std::to_string(*size) + " octets");
    chunk_.size = *size;
    chunk_.refusal.clear();
    if (!in_transaction_) chunk_.refusal = "503 5.5.1 Need MAIL before BDAT";
    else if (tx_.rcpt_accepted.empty()) chunk_.refusal = "554 5.5.1 No valid recipients";
    else if (chunks_ && !chunks_->refusal().empty())
        chunk_.refusal = "503 5.5.1 An earlier BDAT of this transaction failed; send RSET";
    chunk_.take = chunk_.refusal.empty();
    if (chunk_.take && !chunks_) chunks_.emplace(f_.max_message_size, true);
    state_ = state::bdat_chunk;
    return next_io(action::read_chunk, chunk_.size);
}

step machine_impl::on_chunk_end() {
    if (!chunk_.take) return refuse(chunk_.refusal);
    if (chunk_.last) chunks_->finish();
    if (!chunks_->refusal().empty()) {
        // Too big, a bare CR or LF, a long line: the message is refused, never forwarded.
        say(chunks_->refusal());
        tx_.fault = make_fault(fault_class::bad_request, 0, chunks_->refusal());
        tx_.size = chunks_->size();
        if (!chunk_.last) return finish(outcome::ok);  // the client should RSET; further chunks are refused
        return reset_upstream(awaiting::reset_refused_chunks);
    }
    if (!chunk_.last) {
        say("250 2.0.0 " + std::to_string(chunk_.size) + " octets received");
        return finish(outcome::ok);
    }
    tx_.size = chunks_->size();
    auto msg = chunks_->take_message();
    return deliver(std::move(msg), true);
}

/// Sends a whole, checked message upstream; the client gets the upstream's answer. By BDAT
/// when the upstream offers CHUNKING (one write, one reply), else by DATA. `raw`: the
/// message came by BDAT; otherwise it is in DATA's wire form (dot-stuffed).
step machine_impl::deliver(std::string msg, bool raw) {
    if (caps_.chunking) {
        if (!raw) dot_unstuff_in_place(msg);
        auto head = "BDAT " + std::to_string(msg.size()) + " LAST\r\n";
        return send_upstream(awaiting::message, std::move(head), std::move(msg));
    }
    message_ = std::move(msg);
    message_raw_ = raw;
    return upstream_command(awaiting::data_verb, "DATA");
}

step machine_impl::on_data_verb_reply(const reply& r) {
    if (r.code != 354) {
        message_.clear();
        if (!relay_reply(r)) return finish(outcome::end);
        refused_reply_ = reply_text(r);
        return reset_upstream(awaiting::reset_refused_data_verb);
    }
    if (message_raw_) dot_stuff_in_place(message_);
    return send_upstream(awaiting::message, {}, std::exchange(message_, std::string()), ".\r\n");
}

step machine_impl::on_message_reply(const reply& r) {
    // The upstream's answer is the client's answer: 250 only if it took the message.
    if (!relay_reply(r)) return finish(outcome::end);
    close_transaction(reply_text(r), r.code / 100 == 2 ? queue_id(r) : "");
    // A refused BDAT leaves the upstream's transaction to be reset (RFC 3030 2); the
    // transaction is logged already, so this RSET goes out unconditionally.
    if (caps_.chunking && r.code / 100 != 2) return upstream_command(awaiting::reset_refused_message, "RSET");
    return finish(outcome::ok);
}

/// Logs the open transaction (MAIL ... end of DATA, RSET, QUIT or a drop).
void machine_impl::close_transaction(const std::string& upstream_reply, const std::string& queue) {
    if (!in_transaction_) return;
    log_entry e = std::move(tx_);
    e.user = user_;
    e.ehlo = ehlo_;
    e.upstream_reply = upstream_reply;
    e.queue_id = queue;
    const auto& code_from = upstream_reply.empty() ? e.fault.detail : upstream_reply;
    e.status = code_from.size() >= 3 && std::isdigit(static_cast<unsigned char>(code_from[0]))
                   ? std::atoi(code_from.substr(0, 3).c_str())
                   : 0;
    if (e.fault) e.fault.status = e.status;
    if (!identity_refused_.empty()) {
        auto& d = e.fault ? e.fault.detail : e.note;
        d += (d.empty() ? "" : "; ") + std::string("the next tier refused XCLIENT: ") + identity_refused_;
    }
    e.denied = e.rcpt_accepted.empty() && !e.rcpt_refused.empty();
    cb_.log(e);
    reset_transaction();
}

}  // namespace detail

std::unique_ptr<machine> make_machine(session_facts facts, callbacks& cb) {
    return std::make_unique<detail::machine_impl>(std::move(facts), cb);
}

}  // namespace dmz::smtp
