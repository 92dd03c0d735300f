import java.io.File
import java.util.UUID
import okhttp3.MediaType.Companion.toMediaType
import okhttp3.MultipartBody
import okhttp3.OkHttpClient
import okhttp3.Request
import okhttp3.RequestBody.Companion.asRequestBody
import okhttp3.RequestBody.Companion.toRequestBody
import okhttp3.Response
import org.json.JSONObject

const val BROKER = "{{ base }}"
val http = OkHttpClient()
val retryable = setOf(409, 429, 502, 503, 504) // other errors need a fix first

/** Call the broker with the token; retry what may pass later, after Retry-After when given. */
fun call(token: String, request: Request): Response {
    var attempt = 1
    while (true) {
        val response = http.newCall(
            request.newBuilder().header("Authorization", "Bearer $token").build()
        ).execute()
        if (response.code !in retryable || attempt == 5) return response
        val wait = response.header("Retry-After")?.toLongOrNull() ?: (1L shl attempt)
        response.close()
        Thread.sleep(wait * 1000)
        attempt++
    }
}

fun uploadImage(token: String, photo: File): String {
    // 1. An upload URL. The same Idempotency-Key on every retry: never a second upload.
    val create = Request.Builder().url("$BROKER/api/v1/uploads")
        .header("Idempotency-Key", UUID.randomUUID().toString())
        .post("""{"metadata": {"album": "summer"}}""".toRequestBody("application/json".toMediaType()))
        .build()
    val upload = call(token, create).use { JSONObject(it.body!!.string()) }
    val id = upload.getString("id")

    // 2. The file, straight to Cloudflare: multipart, field "file", no token.
    val form = MultipartBody.Builder().setType(MultipartBody.FORM)
        .addFormDataPart("file", photo.name, photo.asRequestBody("image/jpeg".toMediaType()))
        .build()
    http.newCall(Request.Builder().url(upload.getString("upload_url")).post(form).build())
        .execute().close()

    // 3. Done: 200 once ready, 202 while the broker checks (ask again after Retry-After).
    val complete = Request.Builder().url("$BROKER/api/v1/uploads/$id/complete")
        .post(ByteArray(0).toRequestBody()).build()
    for (attempt in 1..30) {
        val response = call(token, complete)
        val wait = response.header("Retry-After")?.toLongOrNull() ?: 1
        response.close()
        if (response.code != 202) break
        Thread.sleep(wait * 1000)
    }

    // 4. A signed URL to show it.
    val signed = Request.Builder().url("$BROKER/api/v1/images/$id/url?variant={{ variant }}").build()
    return call(token, signed).use { JSONObject(it.body!!.string()).getString("url") }
}
